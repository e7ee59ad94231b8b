//! The master's signals: handlers that only set a flag and wake the loop, and what the loop does
//! with each (as PID 1 this includes reaping orphans).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::process::{Pid, WaitId, WaitIdOptions};

use super::MasterHandle;
use super::driver::{Driver, guard};
use crate::signal::Signal;
use crate::supervisor::Event;

impl Driver {
    /// Reports the signals that arrived; what each means is the supervisor's decision.
    pub(super) fn on_signals(&mut self, events: &mut VecDeque<Event>) {
        for signal in self.m.signals.take() {
            if signal != Signal::CHLD {
                tracing::info!("received {signal}");
            }
            events.push_back(Event::Signal { signal });
        }
    }

    /// Runs the user's action bound to `signal` ([`Command::RunSignalAction`](crate::supervisor::Command)).
    pub(super) fn run_signal_action(&mut self, signal: Signal) {
        if let Some((_, action)) = self.m.on_signal.iter_mut().find(|(s, _)| *s == signal) {
            let handle = MasterHandle { shared: self.m.shared.clone() };
            guard("on_signal", Some(action), |f| f(&handle));
        }
    }

    /// As PID 1: reaps the children that are not our workers (orphans re-parented to us). Our
    /// workers are left alone: their pidfds report their exits.
    ///
    /// The kernel re-parents orphans to the init task's main thread, so only its children are
    /// looked at (children that other threads of the program started are theirs to wait for).
    /// `/proc` must be this PID namespace's (as in any container).
    pub(super) fn reap_orphans(&mut self) {
        let ours: Vec<u32> = self.procs.values().map(|p| p.pid).collect();
        let list = std::fs::read_to_string("/proc/self/task/1/children").unwrap_or_default();
        let children: Vec<u32> =
            list.split_whitespace().filter_map(|p| p.parse().ok()).filter(|pid| !ours.contains(pid)).collect();
        for pid in children {
            let Some(raw) = Pid::from_raw(pid as i32) else { continue };
            if let Ok(Some(_)) =
                rustix::process::waitid(WaitId::Pid(raw), WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
            {
                tracing::debug!("reaped orphan process {pid}");
            }
        }
    }
}

/// The signals the master handles whether or not they are bound.
const DEFAULT_HANDLED: [Signal; 7] =
    [Signal::TERM, Signal::INT, Signal::HUP, Signal::QUIT, Signal::USR2, Signal::TTIN, Signal::TTOU];

/// The master's signal handling: handlers only set a flag and write to a self-pipe (via
/// signal-hook); the loop polls the pipe and reads the flags. Unregistered on drop.
pub(super) struct Signals {
    pub(super) read: UnixStream,
    /// SIGCHLD is handled: this master is PID 1 and reaps orphans.
    pub(super) reaps_orphans: bool,
    flags: Vec<(Signal, Arc<AtomicBool>)>,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    /// The handlers of the signals the master always handles, and of `extra` ones (bound
    /// signals; `SIGCHLD` as PID 1).
    pub(super) fn register(extra: &[Signal]) -> io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let mut s = Signals { read, reaps_orphans: extra.contains(&Signal::CHLD), flags: Vec::new(), ids: Vec::new() };
        let mut all = DEFAULT_HANDLED.to_vec();
        all.extend(extra.iter().filter(|s| !DEFAULT_HANDLED.contains(s)));
        for sig in all {
            let flag = Arc::new(AtomicBool::new(false));
            s.ids.push(signal_hook::flag::register(sig.as_raw(), flag.clone())?);
            s.ids.push(signal_hook::low_level::pipe::register(sig.as_raw(), write.try_clone()?)?);
            s.flags.push((sig, flag));
        }
        Ok(s)
    }

    /// Drains the pipe and returns the signals that arrived since the last call.
    fn take(&mut self) -> Vec<Signal> {
        let mut buf = [0u8; 64];
        while matches!(self.read.read(&mut buf), Ok(n) if n > 0) {}
        self.flags.iter().filter(|(_, f)| f.swap(false, Ordering::SeqCst)).map(|(sig, _)| *sig).collect()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
