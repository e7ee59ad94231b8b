//! Sockets of the `ReusePort` group: new connections are routed to the slots whose worker is
//! ready, and the socket of a slot nobody serves any more is closed once no process holds it.

use super::{Command, Phase, ProcState, Supervisor};

impl Supervisor {
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
        if !self.policy.socket_per_slot || self.phase != Phase::Running {
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
}
