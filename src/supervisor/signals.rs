//! The master's signals and what each means: `SIGTERM`/`SIGINT` always shut down; a signal the
//! user bound (`Cluster::on_signal`) runs its action instead of its default; by default
//! `SIGHUP`/`SIGQUIT` shut down gracefully like `SIGTERM`, `SIGUSR2` starts a rolling restart,
//! `SIGUSR1` upgrades the master in place,
//! `SIGTTIN`/`SIGTTOU` add or remove a worker, `SIGCHLD` (PID 1 only) reaps orphans. Also
//! signalling the workers on the user's behalf.

use std::time::{Instant, SystemTime};

use super::{Command, ProcState, Report, Supervisor, signal_bit};
use crate::signal::Signal;

impl Supervisor {
    /// The master received `signal`.
    pub(super) fn on_signal(&mut self, signal: Signal, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        match signal {
            Signal::CHLD => out.push(Command::ReapOrphans),
            // A second one during a shutdown kills the remaining workers (a second Ctrl-C).
            Signal::TERM | Signal::INT => self.on_shutdown(now, out),
            bound if self.policy.bound_signals.contains(&bound) => out.push(Command::RunSignalAction { signal: bound }),
            // The terminal is gone (HUP) or Ctrl-\ (QUIT): stop as gracefully as SIGTERM,
            // instead of the kernel's default of dying without stopping the workers.
            Signal::HUP | Signal::QUIT => self.on_shutdown(now, out),
            Signal::USR2 => self.on_restart(None, now, wall, out),
            Signal::USR1 => self.on_upgrade(None, None, now, out),
            Signal::TTIN => self.on_scale_by(1, now, wall, out),
            Signal::TTOU => self.on_scale_by(-1, now, wall, out),
            _ => {}
        }
    }

    /// Sends `signal` to every active worker (the spec's `cluster_signal_workers`).
    pub(super) fn on_signal_workers(&mut self, signal: Signal, out: &mut Vec<Command>) {
        let mut slots = Vec::new();
        for s in &mut self.slots {
            if let Some(p) = s.current.as_mut().filter(|p| p.state == ProcState::Active) {
                // Remembered: a death by this signal is then not a crash.
                p.signalled |= signal_bit(signal);
                slots.push(s.id);
                out.push(Command::Signal { key: p.key, signal });
            }
        }
        out.push(Command::Report(Report::Signalled { signal, slots }));
    }
}
