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
            // The captured output's log file: reopened here (the supervisor has no say in it).
            if self.m.capture.as_ref().and_then(super::capture::Capture::reopen_signal) == Some(signal) {
                self.reopen_logs();
                continue;
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

    /// As PID 1: reaps the children that are not our workers nor the new master of an upgrade
    /// (orphans re-parented to us). Those are left alone: their pidfds report their exits.
    ///
    /// The kernel re-parents orphans to the init task's main thread, so only its children are
    /// looked at (children that other threads of the program started are theirs to wait for).
    /// `/proc` must be this PID namespace's (as in any container).
    pub(super) fn reap_orphans(&mut self) {
        let ours: std::collections::HashSet<u32> =
            self.procs.values().map(|p| p.pid).chain(self.successor.as_ref().map(|s| s.pid)).collect();
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
const DEFAULT_HANDLED: [Signal; 8] =
    [Signal::TERM, Signal::INT, Signal::HUP, Signal::QUIT, Signal::USR1, Signal::USR2, Signal::TTIN, Signal::TTOU];

/// Signals whose new default (a graceful shutdown) must not override an inherited `SIG_IGN`:
/// `nohup` ignores `SIGHUP`, and a shell starts background jobs with `SIGQUIT` ignored. Unless
/// the program binds them, the master leaves them ignored.
const KEEP_IGNORED: [Signal; 2] = [Signal::HUP, Signal::QUIT];

/// True while no master handles signals in this process (before the first, and after it is
/// dropped): the signals that had the kernel's default action before the first master then act
/// as by default again, instead of being swallowed by handlers nobody reads.
static MASTERLESS: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Signals given that conditional default action already (once per process).
static DEFAULTED: std::sync::Mutex<u64> = std::sync::Mutex::new(0);

/// The master's signal handling: handlers only set a flag and write to a self-pipe (via
/// signal-hook); the loop polls the pipe and reads the flags. On drop they are unregistered, and
/// signals that had the kernel's default action before act by default again.
pub(super) struct Signals {
    pub(super) read: UnixStream,
    /// SIGCHLD is handled: this master is PID 1 and reaps orphans.
    pub(super) reaps_orphans: bool,
    flags: Vec<(Signal, Arc<AtomicBool>)>,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    /// The handlers of the signals the master always handles, and of `extra` ones (bound
    /// signals; `SIGCHLD` as PID 1). `SIGHUP` and `SIGQUIT` inherited as ignored, and not in
    /// `extra`, stay ignored.
    pub(super) fn register(extra: &[Signal]) -> io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let mut s = Signals { read, reaps_orphans: extra.contains(&Signal::CHLD), flags: Vec::new(), ids: Vec::new() };
        let masterless = MASTERLESS.get_or_init(|| Arc::new(AtomicBool::new(false)));
        masterless.store(false, Ordering::SeqCst);
        let mut all = DEFAULT_HANDLED.to_vec();
        all.extend(extra.iter().filter(|s| !DEFAULT_HANDLED.contains(s)));
        for sig in all {
            let before = crate::os::sys::disposition(sig)?;
            if before == crate::os::sys::Disposition::Ignored && KEEP_IGNORED.contains(&sig) && !extra.contains(&sig) {
                tracing::debug!("{sig} is ignored (inherited, as under nohup): leaving it so");
                continue;
            }
            if before == crate::os::sys::Disposition::Default {
                let mut defaulted = DEFAULTED.lock().unwrap_or_else(|e| e.into_inner());
                let bit = 1u64 << (sig.as_raw() as u32 % 64);
                if *defaulted & bit == 0 {
                    // Never unregistered: it acts only while no master handles signals.
                    signal_hook::flag::register_conditional_default(sig.as_raw(), masterless.clone())?;
                    *defaulted |= bit;
                }
            }
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
        if let Some(masterless) = MASTERLESS.get() {
            masterless.store(true, Ordering::SeqCst);
        }
    }
}
