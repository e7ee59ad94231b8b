//! Sockets of the `ReusePort` group: new connections are routed to the slots whose worker is
//! ready (and what follows when the driver cannot steer), and the socket of a slot nobody will
//! serve again is closed once no process holds it.

use super::{Command, Phase, ProcState, Report, SteerFailure, Steering, Supervisor};

impl Supervisor {
    /// Closes the socket of every slot that no process holds and none will hold again: a
    /// removed slot; a slot with no process, no pending spawn (respawn off after a crash or a
    /// clean exit, disabled by crash protection, a revival by a restart that failed) and no
    /// rollout, running or queued, that will start one in it. (Closing a socket a process
    /// still holds would not take it out of the kernel's group, and would reset what that
    /// process still takes from it.) A slot served again later gets a new socket.
    ///
    /// `incremental`: only the sockets of slots marked since the last settle (those of
    /// its retiring workers included); the others were held then and still are.
    pub(super) fn close_unserved(&mut self, out: &mut Vec<Command>, incremental: bool) {
        if self.phase != Phase::Running {
            return;
        }
        let marked = match (self.slots.touched().slots(), self.retiring.touched().slots()) {
            (Some(slots), Some(retiring)) if self.still_incremental(incremental) => Some((slots, retiring)),
            _ => None,
        };
        let unserved: Vec<usize> = match marked {
            Some((slots, retiring)) => {
                let mut v: Vec<usize> = slots
                    .iter()
                    .chain(retiring)
                    .copied()
                    .filter(|&slot| self.sockets.contains(&slot) && !self.holds_or_will_hold(slot))
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            }
            None => self.sockets.iter().copied().filter(|&slot| !self.holds_or_will_hold(slot)).collect(),
        };
        for slot in unserved {
            self.sockets.remove(&slot);
            out.push(Command::CloseSocket { slot });
        }
    }

    /// Whether a process of `slot` holds its socket, or one will be started in it.
    fn holds_or_will_hold(&self, slot: usize) -> bool {
        let retiring = || self.retiring.iter().any(|(s, _)| *s == slot);
        let Some(s) = self.slots.get(slot) else { return retiring() };
        s.current.is_some()
            || s.handed
            || s.gated
            || s.next.is_some()
            || s.next_spawn.is_some()
            || retiring()
            || self.queued_restart.is_some()
            || self.rollout.as_ref().is_some_and(|r| r.reaches(slot))
    }

    /// Whether this master routes new connections now: `ReusePort`, running, steering not
    /// given up, and (a new master of an upgrade) once it took over: until then the old one
    /// does.
    pub(super) fn routes(&self) -> bool {
        self.policy.socket_per_slot
            && self.phase == Phase::Running
            && self.steering != Steering::Off
            && self.takeover != super::Takeover::Pending
    }

    /// Whether `s` is among the slots new connections go to (unless none is): its worker is
    /// ready, or it was handed to the new master of a slot-by-slot upgrade, whose worker serves
    /// it (if this master holds its socket: one the new master bound is not in its picture of
    /// the group).
    pub(super) fn ready_to_route(&self, s: &super::Slot) -> bool {
        (!s.disabled && s.current.as_ref().is_some_and(|p| p.state == ProcState::Active))
            || (s.handed && self.sockets.contains(&s.id))
    }

    /// Routes new connections to the slots whose worker is ready, if that set changed. While
    /// no slot is ready (the start-up, or every worker crashed), to the slots whose worker was
    /// started and is not stopping: each connection then waits for a worker that exists, never
    /// on the socket of a slot that will only be spawned later (or respawned after a delay).
    /// With none of those either, the route is empty: the driver then leaves the whole group.
    ///
    /// `incremental`: the ready slots and the started ones are brought up to date from the
    /// slots marked since the last settle.
    pub(super) fn update_route(&mut self, out: &mut Vec<Command>, incremental: bool) {
        /// Puts slot `i` in the sorted list `kept` or takes it out.
        fn place(kept: &mut Vec<usize>, i: usize, belongs: bool) {
            match (kept.binary_search(&i), belongs) {
                (Err(at), true) => kept.insert(at, i),
                (Ok(at), false) => {
                    kept.remove(at);
                }
                _ => {}
            }
        }
        if !self.routes() {
            return;
        }
        let n = self.slots.len();
        let incremental = self.still_incremental(incremental);
        let (mut ready, mut started) = (std::mem::take(&mut self.cache.ready), std::mem::take(&mut self.cache.started));
        match self.slots.touched().slots().filter(|_| incremental) {
            Some(marked) => {
                for &i in marked.iter().filter(|&&i| i < n) {
                    let s = &self.slots[i];
                    place(&mut ready, i, self.ready_to_route(s));
                    place(&mut started, i, Self::started_to_route(s));
                }
            }
            None => {
                ready = self.slots.iter().filter(|s| self.ready_to_route(s)).map(|s| s.id).collect();
                started = self.slots.iter().filter(|s| Self::started_to_route(s)).map(|s| s.id).collect();
            }
        }
        let route = if ready.is_empty() { &started } else { &ready };
        if *route != self.routed {
            self.routed.clone_from(route);
            out.push(Command::Route { slots: route.clone() });
        }
        (self.cache.ready, self.cache.started) = (ready, started);
    }

    /// Whether `s` is among the slots new connections go to while no slot is ready: its
    /// worker was started and is not stopping.
    pub(super) fn started_to_route(s: &super::Slot) -> bool {
        !s.disabled && s.current.as_ref().is_some_and(|p| p.state != ProcState::Stopping)
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
