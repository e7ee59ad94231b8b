//! Connection steering for `Balance::ReusePort`: which of the group's sockets a new connection
//! goes to.
//!
//! Without help, the kernel hashes every new connection over *all* sockets of a `SO_REUSEPORT`
//! group, including the socket of a slot whose worker just crashed (connections wait there for
//! the respawn), of a worker that is not ready yet, and of a slot being removed (closing its
//! socket would reset what is queued on it). The master therefore attaches a classic BPF program
//! to the group (`SO_ATTACH_REUSEPORT_CBPF`) that picks a socket at random among the slots the
//! supervisor routes to; the others receive nothing new, and drain what they hold.
//!
//! The program returns an *index into the kernel's array of the group's sockets*. That array is
//! in `listen()` order, and when a socket leaves the group the last one takes its place. The
//! master creates and closes every socket of the group, so [`Group`] mirrors that array.

use std::os::fd::AsFd;

use std::collections::VecDeque;

use super::Balance;
use super::driver::Driver;
use crate::supervisor::{Event, SteerFailure};

/// The kernel's array of a reuseport group, as slot ids (mirrors `struct sock_reuseport`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Group {
    members: Vec<usize>,
    /// A member joined or left since [`Group::take_changed`] was last called.
    changed: bool,
}

impl Group {
    /// A group as another master left it (an upgrade): its array, as slots.
    pub(crate) fn with_members(members: Vec<usize>) -> Group {
        Group { members, changed: true }
    }

    /// The array, as slots.
    pub(crate) fn members(&self) -> &[usize] {
        &self.members
    }

    /// A socket of `slot` started listening: it joins at the end.
    pub(crate) fn join(&mut self, slot: usize) {
        self.members.push(slot);
        self.changed = true;
    }

    /// The socket of `slot` was closed by its last holder: the last member takes its place.
    pub(crate) fn leave(&mut self, slot: usize) {
        if let Some(i) = self.members.iter().position(|&s| s == slot) {
            self.members.swap_remove(i);
            self.changed = true;
        }
    }

    /// Whether the group changed since the last call (a program attached before indexes the
    /// old array).
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The program that sends new connections, at random, to the sockets of `slots` (those in
    /// the group); to all of them if none is. `None` if the group is empty or too large for a
    /// classic BPF program (then the kernel's own hashing applies).
    pub(crate) fn program(&self, slots: &[usize]) -> Option<Vec<libc::sock_filter>> {
        // Slot numbers are small (below the slot count): a bitmap, no hashing.
        let mut routed = vec![false; slots.iter().max().map_or(0, |&m| m + 1)];
        for &s in slots {
            routed[s] = true;
        }
        let mut targets: Vec<u32> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, s)| routed.get(**s).copied().unwrap_or(false))
            .map(|(i, _)| i as u32)
            .collect();
        if targets.is_empty() {
            targets = (0..self.members.len() as u32).collect();
        }
        program_for(&targets, self.members.len())
    }
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
const BPF_ADD_K: u16 = (libc::BPF_ALU | libc::BPF_ADD | libc::BPF_K) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Classic BPF programs are limited to this many instructions.
const MAX_INSNS: usize = 4096;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// `A = random % targets.len()`, then return `targets[A]` (`targets` ascending, below
/// `group_len`), in the shorter of two forms, so that a route change costs the kernel (which
/// checks and compiles every program attached) what changed, not the group's size:
///
/// - *skips*, when few of the group are left out: for each left-out index `e` below the last
///   target, ascending, `if A >= e: A += 1`, then return `A` (the `A`-th index not left out).
///   All routed: no skip at all. One worker of 1024 respawning: one skip, 5 instructions.
/// - *a table*, when few are routed: `if A == i: return targets[i]` for each.
///
/// `None` if neither fits a classic BPF program (then the kernel's own hashing applies).
fn program_for(targets: &[u32], group_len: usize) -> Option<Vec<libc::sock_filter>> {
    let (Some(&last), false) = (targets.last(), group_len == 0) else { return None };
    let mut p = vec![
        insn(BPF_LD_W_ABS, 0, 0, (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32),
        insn(BPF_MOD_K, 0, 0, targets.len() as u32),
    ];
    // The indexes left out below the last target (those above it are never reached).
    let mut routed = targets.iter().peekable();
    let skipped: Vec<u32> = (0..last)
        .filter(|i| {
            while routed.next_if(|&&t| t < *i).is_some() {}
            routed.peek() != Some(&i)
        })
        .collect();
    if skipped.len() <= targets.len() {
        if 2 + 2 * skipped.len() + 1 > MAX_INSNS {
            return None;
        }
        for e in skipped {
            // if A >= e: A += 1 (the next instruction), else skip it.
            p.push(insn(BPF_JGE_K, 0, 1, e));
            p.push(insn(BPF_ADD_K, 0, 0, 1));
        }
        p.push(insn(BPF_RET_A, 0, 0, 0));
    } else {
        if 2 + 2 * targets.len() + 1 > MAX_INSNS {
            return None;
        }
        for (i, &t) in targets.iter().enumerate() {
            // if A == i: return t (next instruction), else skip it.
            p.push(insn(BPF_JEQ_K, 0, 1, i as u32));
            p.push(insn(BPF_RET_K, 0, 0, t));
        }
        p.push(insn(BPF_RET_K, 0, 0, targets[0]));
    }
    Some(p)
}

impl Driver {
    /// Attaches the steering program for the current route to the group of every `ReusePort`
    /// listener. What it cannot do is reported to the supervisor ([`Event::SteerFailed`]: the
    /// first failure), which decides what follows.
    pub(super) fn apply_route(&mut self, events: &mut VecDeque<Event>) {
        // Once handed over, the new master of an upgrade steers the groups.
        if self.steering_failed || self.steering_handed_over {
            return;
        }
        let mut failure = None;
        for b in self.m.listeners.iter().filter(|b| b.balance == Balance::ReusePort) {
            let Some(any) = b.fds.iter().flatten().next() else { continue };
            let failed = match b.group.program(&self.route) {
                None => SteerFailure::NoProgram { slots: self.route.len() },
                Some(program) => match crate::os::sys::attach_reuseport_cbpf(any.as_fd(), &program) {
                    Ok(()) => continue,
                    Err(e) => SteerFailure::Attach { error: e.to_string() },
                },
            };
            failure.get_or_insert(failed);
        }
        if let Some(failure) = failure {
            events.push_back(Event::SteerFailed { failure });
        }
    }

    /// Detaches the steering programs: the kernel hashes over each whole group. `for_good`:
    /// never attach one again.
    pub(super) fn unsteer(&mut self, for_good: bool) {
        self.steering_failed |= for_good;
        if self.steering_handed_over {
            return;
        }
        for b in self.m.listeners.iter().filter(|b| b.balance == Balance::ReusePort) {
            if let Some(any) = b.fds.iter().flatten().next() {
                // Nothing attached (ENOENT) is as good.
                let _ = crate::os::sys::detach_reuseport_bpf(any.as_fd());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    /// Evaluates a program the way the kernel would, with `random` as the random number.
    fn run(p: &[libc::sock_filter], random: u32) -> u32 {
        let mut a = 0u32;
        let mut pc = 0;
        loop {
            let i = p[pc];
            match i.code {
                BPF_LD_W_ABS => a = random,
                BPF_MOD_K => a %= i.k,
                BPF_ADD_K => a = a.wrapping_add(i.k),
                BPF_JEQ_K => {
                    pc += if a == i.k { i.jt as usize } else { i.jf as usize };
                }
                BPF_JGE_K => {
                    pc += if a >= i.k { i.jt as usize } else { i.jf as usize };
                }
                BPF_RET_A => return a,
                BPF_RET_K => return i.k,
                other => panic!("unexpected instruction {other:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn the_group_mirrors_the_kernels_swap_remove() {
        let mut g = Group::default();
        for s in 0..4 {
            g.join(s);
        }
        g.leave(1);
        assert_eq!(g.members, vec![0, 3, 2]);
        g.join(1);
        assert_eq!(g.members, vec![0, 3, 2, 1]);
        g.leave(7);
        assert_eq!(g.members.len(), 4);
    }

    #[test]
    fn programs_pick_only_routed_slots() {
        let mut g = Group::default();
        for s in 0..4 {
            g.join(s);
        }
        // A prefix: the cheap program.
        let p = g.program(&[0, 1, 2]).unwrap();
        assert_eq!(p.len(), 3);
        let picked: std::collections::BTreeSet<u32> = (0..100).map(|r| run(&p, r)).collect();
        assert_eq!(picked, [0, 1, 2].into());
        // Not a prefix: the table.
        g.leave(0); // members: [3, 1, 2]
        let p = g.program(&[2, 3]).unwrap();
        let picked: std::collections::BTreeSet<u32> = (0..100).map(|r| run(&p, r)).collect();
        assert_eq!(picked, [0, 2].into(), "indices of slots 3 and 2");
        // Nobody routed: everyone.
        let p = g.program(&[]).unwrap();
        let picked: std::collections::BTreeSet<u32> = (0..100).map(|r| run(&p, r)).collect();
        assert_eq!(picked, [0, 1, 2].into());
        assert!(Group::default().program(&[0]).is_none());
    }

    /// Every route over groups of up to 10 sockets: the program returns `targets[r % n]` for
    /// the random number `r`, so each routed socket gets its share and no other socket any;
    /// and it is as short as the smaller of what is left out and what is routed.
    #[test]
    fn every_route_maps_the_random_number_onto_the_routed_sockets_evenly() {
        for len in 1..=10usize {
            for mask in 1u32..(1 << len) {
                let targets: Vec<u32> = (0..len as u32).filter(|i| mask & (1 << i) != 0).collect();
                let p = program_for(&targets, len).unwrap();
                for r in 0..(3 * targets.len() as u32 + 7) {
                    assert_eq!(run(&p, r), targets[r as usize % targets.len()], "{targets:?} of {len}, r = {r}");
                }
                let last = *targets.last().unwrap() as usize;
                let left_out = last + 1 - targets.len();
                assert_eq!(p.len(), 3 + 2 * left_out.min(targets.len()), "{targets:?} of {len}");
            }
        }
        // One worker of 1024 respawning: one skip; every other one: a table of 512.
        let all_but_one: Vec<u32> = (0..1024).filter(|&i| i != 500).collect();
        assert_eq!(program_for(&all_but_one, 1024).unwrap().len(), 5);
        let evens: Vec<u32> = (0..1024).step_by(2).collect();
        assert_eq!(program_for(&evens, 1024).unwrap().len(), 3 + 2 * 511);
        // Too large either way: none (the kernel's hashing).
        let half: Vec<u32> = (0..8192).step_by(2).collect();
        assert!(program_for(&half, 8192).is_none());
        assert!(program_for(&[], 4).is_none());
    }

    /// The real kernel: with two sockets in a group and a program routing to slot 1 only, every
    /// new connection lands on slot 1's socket.
    #[test]
    fn the_kernel_follows_the_program() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (fds, addr) = crate::os::socket::bind_listeners(addr, true, 2, 64, false).unwrap();
        let mut group = Group::default();
        group.join(0);
        group.join(1);
        let listeners: Vec<TcpListener> = fds.into_iter().map(|fd: OwnedFd| TcpListener::from(fd)).collect();
        for l in &listeners {
            l.set_nonblocking(true).unwrap();
        }
        let count = |expect_routed: usize| {
            let program = group.program(&[expect_routed]).unwrap();
            crate::os::sys::attach_reuseport_cbpf(listeners[0].as_fd(), &program).unwrap();
            let conns: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
            std::thread::sleep(Duration::from_millis(50));
            let accepted: Vec<usize> =
                listeners.iter().map(|l| std::iter::from_fn(|| l.accept().ok()).count()).collect();
            drop(conns);
            accepted
        };
        assert_eq!(count(1), vec![0, 20]);
        assert_eq!(count(0), vec![20, 0]);
        // Detached: the kernel's own hashing over both again.
        crate::os::sys::detach_reuseport_bpf(listeners[0].as_fd()).unwrap();
        let _conns: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(50));
        let accepted: Vec<usize> = listeners.iter().map(|l| std::iter::from_fn(|| l.accept().ok()).count()).collect();
        assert!(accepted.iter().all(|&n| n > 0) && accepted.iter().sum::<usize>() == 40, "{accepted:?}");
        // Both: spread at random.
        let program = group.program(&[0, 1]).unwrap();
        crate::os::sys::attach_reuseport_cbpf(listeners[1].as_fd(), &program).unwrap();
        let _conns: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(50));
        let accepted: Vec<usize> = listeners.iter().map(|l| std::iter::from_fn(|| l.accept().ok()).count()).collect();
        assert_eq!(accepted.iter().sum::<usize>(), 40);
        assert!(accepted.iter().all(|&n| n >= 5), "{accepted:?}");
    }

    /// The real kernel takes the skipping form too: three sockets, the middle one left out.
    #[test]
    fn the_kernel_follows_a_program_that_skips_a_socket() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (fds, addr) = crate::os::socket::bind_listeners(addr, true, 3, 64, false).unwrap();
        let mut group = Group::default();
        for s in 0..3 {
            group.join(s);
        }
        let listeners: Vec<TcpListener> = fds.into_iter().map(|fd: OwnedFd| TcpListener::from(fd)).collect();
        for l in &listeners {
            l.set_nonblocking(true).unwrap();
        }
        let program = group.program(&[0, 2]).unwrap();
        assert!(program.iter().any(|i| i.code == BPF_JGE_K), "the skipping form");
        crate::os::sys::attach_reuseport_cbpf(listeners[0].as_fd(), &program).unwrap();
        let _conns: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(50));
        let accepted: Vec<usize> = listeners.iter().map(|l| std::iter::from_fn(|| l.accept().ok()).count()).collect();
        assert_eq!(accepted.iter().sum::<usize>(), 60, "{accepted:?}");
        assert_eq!(accepted[1], 0, "{accepted:?}");
        assert!(accepted[0] >= 10 && accepted[2] >= 10, "{accepted:?}");
    }
}
