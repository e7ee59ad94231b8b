//! Sockets of the `ReusePort` group: new connections are routed to the slots whose worker is
//! ready, and the socket of a slot nobody serves any more is closed once no process holds it.

use super::{Command, Phase, ProcState, Report, SteerFailure, Steering, Supervisor};

impl Supervisor {
    /// Closes the sockets of disabled or removed slots that no process holds any more. A slot
    /// that got a process again (revived by a restart, re-added by scaling) keeps its socket.
    pub(super) fn close_unserved(&mut self, out: &mut Vec<Command>) {
        let (mut close, mut wait) = (Vec::new(), std::collections::BTreeSet::new());
        for &s in &self.unserved {
            if self.slots.get(s).is_some_and(|slot| !slot.disabled) {
                continue; // served again: keep the socket
            }
            if self.procs().any(|(slot, _)| slot == s) {
                wait.insert(s);
            } else {
                close.push(s);
            }
        }
        self.unserved = wait;
        out.extend(close.into_iter().map(|slot| Command::CloseSocket { slot }));
    }

    /// Routes new connections to the slots whose worker is ready, if that set changed.
    pub(super) fn update_route(&mut self, out: &mut Vec<Command>) {
        if !self.policy.socket_per_slot || self.phase != Phase::Running || self.steering == Steering::Off {
            return;
        }
        let ready: Vec<usize> = self
            .slots
            .iter()
            .filter(|s| !s.disabled && s.current.as_ref().is_some_and(|p| p.state == ProcState::Active))
            .map(|s| s.id)
            .collect();
        if ready != self.routed {
            self.routed = ready.clone();
            out.push(Command::Route { slots: ready });
        }
    }

    /// The driver could not steer connections as routed. A route no program fits is left to
    /// the kernel's hashing until a later one fits (reported once); a program the kernel
    /// refuses ends steering for good.
    pub(super) fn on_steer_failed(&mut self, failure: SteerFailure, out: &mut Vec<Command>) {
        if self.steering == Steering::Off {
            return;
        }
        match failure {
            SteerFailure::NoProgram { slots } => {
                out.push(Command::Unsteer { for_good: false });
                if self.steering == Steering::On {
                    self.steering = Steering::Unfit;
                    out.push(Command::Report(Report::RouteTooLarge { slots }));
                }
            }
            SteerFailure::Attach { error } => {
                self.steering = Steering::Off;
                out.push(Command::Unsteer { for_good: true });
                out.push(Command::Report(Report::SteeringFailed { error }));
            }
        }
    }
}
