//! The master's loop: feeds events to the supervisor at the current time, carries out the
//! commands it returns, and sleeps in `poll` until something happens or a deadline passes.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::time::{Instant, SystemTime};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, WaitId, WaitIdOptions};

use super::Balance;
use super::channel::MasterEnd;
use super::control::{ConnId, ControlServer};
use super::notify::Notifier;
use super::steer::Group;
use super::{Master, Request, Snapshot};
use crate::error::Error;
use crate::proto::channel::{ToMaster, ToWorker};
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
}

/// What a polled descriptor belongs to.
#[derive(Clone, Copy)]
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
    Successor,
    SuccessorExit,
    Predecessor,
    /// A worker's stdout or stderr pipe (captured output).
    Output(WorkerKey, crate::proto::control::LogStream),
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
            self.publish();
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
                Ok(mut p) => {
                    if let (Some(c), Some(output)) = (self.m.capture.as_mut(), p.output.take()) {
                        c.add(key, p.slot, p.pid, output);
                    }
                    events.push_back(Event::Spawned { key, pid: p.pid });
                    self.procs.insert(key, p);
                }
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
    /// The statistics now, with each worker's resource figures from `/proc`.
    pub(super) fn stats_now(&self) -> (ClusterStats, Vec<WorkerStats>) {
        let (mut cluster, mut workers) = (self.sup.cluster_stats(), self.sup.worker_stats(Instant::now()));
        cluster.listeners = self.listener_stats();
        cluster.log_lines_dropped = self.m.capture.as_ref().map_or(0, super::capture::Capture::dropped);
        for w in &mut workers {
            w.notify_status = w.pid.and_then(|pid| self.procs.values().find(|p| p.pid == pid)?.status_text.clone());
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

    /// Publishes the statistics for handles and module functions.
    fn publish(&self) {
        let now = Instant::now();
        let mut cluster = self.sup.cluster_stats();
        cluster.listeners = self.listener_stats();
        cluster.log_lines_dropped = self.m.capture.as_ref().map_or(0, super::capture::Capture::dropped);
        let snap = Snapshot { cluster, workers: self.sup.worker_stats(now), taken: now };
        *self.m.shared.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snap;
    }

    /// Sleeps until something happens or the supervisor's deadline passes; queues what happened.
    fn poll(&mut self, events: &mut VecDeque<Event>) -> Result<(), Error> {
        let deadline = [
            self.sup.next_deadline(),
            self.m.control.as_ref().and_then(ControlServer::next_deadline),
            self.m.admin.as_ref().and_then(|(a, _)| a.next_deadline()),
            self.procs.values().filter_map(|p| p.ready_at).min(),
            self.m.notify.as_ref().and_then(Notifier::watchdog_due),
            self.m.capture.as_ref().and_then(super::capture::Capture::next_deadline),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            // Round up to the next millisecond so we never wake just before the deadline.
            let ms = left.as_nanos().div_ceil(1_000_000);
            Timespec { tv_sec: (ms / 1000) as i64, tv_nsec: ((ms % 1000) * 1_000_000) as i64 }
        });
        let mut sources = vec![Source::Signals, Source::Wake];
        let mut fds =
            vec![PollFd::new(&self.m.signals.read, PollFlags::IN), PollFd::new(&self.m.shared.wake, PollFlags::IN)];
        for (key, p) in &self.procs {
            sources.push(Source::Exit(*key));
            fds.push(PollFd::new(&p.pidfd, PollFlags::IN));
            if let Some(chan) = p.chan.as_ref().filter(|c| !c.closed) {
                // Backpressure: no input while the worker's answers pile up unread.
                let mut flags = PollFlags::empty();
                if chan.wants_read() {
                    flags |= PollFlags::IN;
                }
                if chan.wants_write() {
                    flags |= PollFlags::OUT;
                }
                sources.push(Source::Channel(*key));
                fds.push(PollFd::new(&chan.io.sock, flags));
            }
        }
        for (key, fd) in self.m.capture.iter().flat_map(super::capture::Capture::fds) {
            sources.push(Source::Output(key.0, key.1));
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        if let Some(s) = &self.successor {
            sources.push(Source::SuccessorExit);
            fds.push(PollFd::new(&s.pidfd, PollFlags::IN));
            // Once its end is closed nothing is polled (a program that closed the channel but
            // runs on would keep a socket in error readable for ever): its pidfd tells the rest.
            let flags = if s.closed {
                PollFlags::empty()
            } else {
                PollFlags::IN | if s.chan.wants_write() { PollFlags::OUT } else { PollFlags::empty() }
            };
            if !flags.is_empty() {
                sources.push(Source::Successor);
                fds.push(PollFd::new(&s.chan.sock, flags));
            }
        }
        if let Some(p) = &self.predecessor {
            let flags = PollFlags::IN | if p.chan.wants_write() { PollFlags::OUT } else { PollFlags::empty() };
            sources.push(Source::Predecessor);
            fds.push(PollFd::new(&p.chan.sock, flags));
        }
        if let Some(ctl) = self.m.control.as_ref().filter(|_| self.owns_outside) {
            if ctl.accepting() {
                sources.push(Source::ControlListener);
                fds.push(PollFd::new(ctl.listener(), PollFlags::IN));
            }
            for (id, sock, read, write) in ctl.sockets() {
                let mut flags = PollFlags::empty();
                if read {
                    flags |= PollFlags::IN;
                }
                if write {
                    flags |= PollFlags::OUT;
                }
                if !flags.is_empty() {
                    sources.push(Source::Control(id));
                    fds.push(PollFd::new(sock, flags));
                }
            }
        }
        let now = Instant::now();
        if let Some((_, notify)) = &self.m.command {
            sources.push(Source::WorkerNotify);
            fds.push(PollFd::from_borrowed_fd(notify.socket(), PollFlags::IN));
        }
        if let Some((admin, _)) = self.m.admin.as_ref().filter(|_| self.owns_outside) {
            if admin.accepting(now) {
                sources.push(Source::AdminListener);
                fds.push(PollFd::from_borrowed_fd(admin.listener(), PollFlags::IN));
            }
            for (id, sock, read, write) in admin.sockets() {
                let flags = if read { PollFlags::IN } else { PollFlags::empty() }
                    | if write { PollFlags::OUT } else { PollFlags::empty() };
                sources.push(Source::Admin(id));
                fds.push(PollFd::from_borrowed_fd(sock, flags));
            }
        }
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(Error::Io { context: "poll failed in the master loop", source: e.into() }),
        }
        let ready: Vec<Source> =
            fds.iter().zip(&sources).filter(|(fd, _)| !fd.revents().is_empty()).map(|(_, s)| *s).collect();
        drop(fds);
        // Channels first: a worker's last messages come before its exit; its output too.
        for s in ready.iter().filter(|s| matches!(s, Source::Channel(_) | Source::Output(..))) {
            match *s {
                Source::Channel(key) => self.on_channel(key, events),
                Source::Output(key, stream) => {
                    let lines = self.m.capture.as_mut().map(|c| c.read((key, stream))).unwrap_or_default();
                    self.forward_logs(&lines);
                }
                _ => {}
            }
        }
        for s in ready {
            match s {
                Source::Signals => self.on_signals(events),
                Source::Wake => self.on_wake(events),
                Source::Exit(key) => self.on_exit(key, events),
                Source::Channel(_) | Source::Output(..) => {}
                Source::ControlListener => {
                    if let Some(ctl) = &mut self.m.control {
                        ctl.accept(Instant::now());
                    }
                }
                Source::Control(id) => self.on_control(id, events),
                Source::AdminListener => {
                    if let Some((admin, _)) = &mut self.m.admin {
                        admin.accept(Instant::now());
                    }
                }
                Source::Admin(id) => self.on_admin(id),
                Source::WorkerNotify => self.on_worker_notify(events),
                Source::Successor => self.on_successor_channel(events),
                Source::SuccessorExit => self.on_successor_exit(events),
                Source::Predecessor => self.on_predecessor_channel(events),
            }
        }
        // A command cluster's workers taken for ready after a delay.
        let now = Instant::now();
        for (key, p) in &mut self.procs {
            if p.ready_at.is_some_and(|t| t <= now) {
                p.ready_at = None;
                events.push_back(Event::Ready { key: *key });
            }
        }
        // The pipes of exited workers whose time is up.
        let lines = self.m.capture.as_mut().map(|c| c.expire(Instant::now())).unwrap_or_default();
        self.forward_logs(&lines);
        if let Some(ctl) = &mut self.m.control {
            ctl.close_idle(Instant::now());
        }
        if let Some((admin, _)) = &mut self.m.admin {
            admin.close_idle(Instant::now());
        }
        if let Some(n) = self.m.notify.as_mut() {
            let now = Instant::now();
            n.watchdog(now, self.sup.watchdog(now));
        }
        Ok(())
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
                self.procs.remove(&key);
                if let Some(c) = &mut self.m.capture {
                    c.exited(key, Instant::now());
                }
                events.push_back(Event::Lost { key });
                return;
            }
        };
        self.procs.remove(&key);
        if let Some(c) = &mut self.m.capture {
            c.exited(key, Instant::now());
        }
        events.push_back(Event::Exited { key, status });
    }

    fn on_channel(&mut self, key: WorkerKey, events: &mut VecDeque<Event>) {
        let Some(p) = self.procs.get_mut(&key) else { return };
        let Some(chan) = p.chan.as_mut() else { return };
        chan.flush();
        for _ in 0..super::channel::MAX_BATCHES {
            self.take_messages(key, events);
            if !self.procs.get(&key).and_then(|p| p.chan.as_ref()).is_some_and(|c| c.can_answer_more()) {
                break;
            }
        }
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
            let _ = crate::os::sys::pidfd_send_signal(s.pidfd.as_fd(), crate::signal::Signal::KILL);
            let _ = rustix::process::waitid(WaitId::PidFd(s.pidfd.as_fd()), WaitIdOptions::EXITED);
        }
        for (_, p) in self.procs.drain() {
            let _ = crate::os::sys::pidfd_send_signal(p.pidfd.as_fd(), crate::signal::Signal::KILL);
            let _ = rustix::process::waitid(WaitId::PidFd(p.pidfd.as_fd()), WaitIdOptions::EXITED);
        }
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
