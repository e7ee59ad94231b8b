//! An epoll set with registration: each descriptor is added once under a token (a `u64` its
//! owner chooses), its interest changed only when it changes, and removed when its source goes.
//! What the master's loop sleeps in (see ARCHITECTURE.md, "The driver").
//!
//! Level-triggered: a descriptor reported ready and not read to the end is reported again by the
//! next wait, as `poll(2)` would, so a bounded read per wake-up loses nothing. The set keeps what
//! it registered (descriptor number and flags, by token), so [`Poller::set`] costs a system call
//! only when something changed, and [`Poller::is_stale`] tells an event of a token it no longer
//! knows (a registration that outlived its source: see [`Poller::reset`]).

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};

/// What a registered descriptor is polled for. With neither, only errors and hang-ups are
/// reported (as `poll(2)` reports them for a descriptor polled with no events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Interest {
    pub(crate) read: bool,
    pub(crate) write: bool,
}

impl Interest {
    pub(crate) const READ: Interest = Interest { read: true, write: false };

    fn flags(self) -> EventFlags {
        let mut f = EventFlags::empty();
        if self.read {
            f |= EventFlags::IN;
        }
        if self.write {
            f |= EventFlags::OUT;
        }
        f
    }
}

/// The most events one wait returns; the others are reported by the next one (level-triggered:
/// nothing is lost, and the kernel rotates its ready list, so nobody starves).
const MAX_EVENTS: usize = 1024;

/// An epoll instance and what is registered in it.
pub(crate) struct Poller {
    ep: OwnedFd,
    /// Each registered token's descriptor (by number) and flags.
    regs: HashMap<u64, (RawFd, EventFlags)>,
    /// Tokens removed since the last wait: an event of theirs in the batch being handled is
    /// not stale.
    removed: HashSet<u64>,
    events: Vec<epoll::Event>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").field("registered", &self.regs.len()).finish_non_exhaustive()
    }
}

impl Poller {
    /// An empty set (close-on-exec: no child inherits it).
    pub(crate) fn new() -> io::Result<Poller> {
        Ok(Poller {
            ep: epoll::create(CreateFlags::CLOEXEC)?,
            regs: HashMap::new(),
            removed: HashSet::new(),
            events: Vec::with_capacity(MAX_EVENTS),
        })
    }

    /// Polls `fd` for `interest` under `token`: added the first time, modified when the
    /// interest changed, and no system call otherwise. A token names one open descriptor for as
    /// long as it is registered: once that descriptor is closed, the token is
    /// [`forget`](Poller::forget)ten before it names another.
    ///
    /// # Errors
    ///
    /// What `epoll_ctl` says: `ENOMEM`, `ENOSPC` (the user's `max_user_watches`), `EEXIST` if
    /// the same descriptor is registered under another token.
    pub(crate) fn set(&mut self, token: u64, fd: BorrowedFd<'_>, interest: Interest) -> io::Result<()> {
        let (raw, flags) = (fd.as_raw_fd(), interest.flags());
        match self.regs.get(&token) {
            Some(&(r, f)) if r == raw && f == flags => return Ok(()),
            Some(&(r, _)) if r == raw => epoll::modify(&self.ep, fd, EventData::new_u64(token), flags)?,
            // A new descriptor under a known token: the old one was closed, and closing it took
            // it out of the set.
            _ => epoll::add(&self.ep, fd, EventData::new_u64(token), flags)?,
        }
        self.regs.insert(token, (raw, flags));
        self.removed.remove(&token);
        Ok(())
    }

    /// Stops polling `fd`, registered under `token` (it must still be open: a closed descriptor
    /// left the set by itself, see [`forget`](Poller::forget)). Nothing if it is not registered.
    pub(crate) fn remove(&mut self, token: u64, fd: BorrowedFd<'_>) {
        if let Some((raw, _)) = self.regs.remove(&token) {
            if raw == fd.as_raw_fd() {
                // ENOENT or EBADF: it is not in the set any more; nothing to undo.
                let _ = epoll::delete(&self.ep, fd);
            }
            self.removed.insert(token);
        }
    }

    /// Forgets `token`, whose descriptor was closed: the kernel took it out of the set (once
    /// no other descriptor refers to the same open file; if one does, its events come back
    /// under a token the set no longer knows: [`is_stale`](Poller::is_stale)).
    pub(crate) fn forget(&mut self, token: u64) {
        if self.regs.remove(&token).is_some() {
            self.removed.insert(token);
        }
    }

    /// Whether `token` is registered.
    #[cfg(test)]
    pub(crate) fn contains(&self, token: u64) -> bool {
        self.regs.contains_key(&token)
    }

    /// How many descriptors are registered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.regs.len()
    }

    /// An event of the last wait is stale: its token was neither registered then nor removed
    /// since. Its registration outlived the descriptor it was made with (the open file lives on
    /// in a duplicate somewhere), and it cannot be taken out by number any more: the caller
    /// [`reset`](Poller::reset)s the set and registers its sources again.
    pub(crate) fn is_stale(&self, token: u64) -> bool {
        !self.regs.contains_key(&token) && !self.removed.contains(&token)
    }

    /// A new, empty epoll instance in place of this one (the old one is closed, and with it
    /// every registration, stale ones included).
    ///
    /// # Errors
    ///
    /// `epoll_create1` failing (`EMFILE`, `ENFILE`, `ENOMEM`): the old set is kept.
    pub(crate) fn reset(&mut self) -> io::Result<()> {
        self.ep = epoll::create(CreateFlags::CLOEXEC)?;
        self.regs.clear();
        self.removed.clear();
        Ok(())
    }

    /// Waits until a registered descriptor is ready or `timeout` passed (`None`: without end),
    /// and puts the tokens of what is ready in `ready` (cleared first), at most [`MAX_EVENTS`].
    /// Interrupted by a signal, it returns with none.
    ///
    /// # Errors
    ///
    /// `epoll_wait` failing otherwise (`EBADF`, `EINVAL`: a bug).
    pub(crate) fn wait(&mut self, timeout: Option<Duration>, ready: &mut Vec<u64>) -> io::Result<()> {
        // Whole milliseconds, rounded up (never wake just before a deadline), and within what
        // plain `epoll_pwait` takes (about 24 days; waking early is harmless).
        let timeout = timeout.map(|left| {
            let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i64;
            rustix::event::Timespec { tv_sec: ms / 1000, tv_nsec: (ms % 1000) * 1_000_000 }
        });
        ready.clear();
        self.removed.clear();
        self.events.clear();
        match epoll::wait(&self.ep, rustix::buffer::spare_capacity(&mut self.events), timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        ready.extend(self.events.iter().map(|e| e.data.u64()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    const SECOND: Option<Duration> = Some(Duration::from_secs(1));
    const NOW: Option<Duration> = Some(Duration::ZERO);

    fn pipe() -> (OwnedFd, OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
    }

    fn ready(p: &mut Poller, timeout: Option<Duration>) -> Vec<u64> {
        let mut r = Vec::new();
        p.wait(timeout, &mut r).unwrap();
        r.sort_unstable();
        r
    }

    /// Registered once, reported while readable (level-triggered), quiet once read; interest
    /// changes take effect; a removed descriptor is not reported.
    #[test]
    fn registered_descriptors_are_reported_while_ready() {
        let mut p = Poller::new().unwrap();
        let (r1, w1) = pipe();
        let (r2, w2) = pipe();
        p.set(1, r1.as_fd(), Interest::READ).unwrap();
        p.set(2, r2.as_fd(), Interest::READ).unwrap();
        p.set(2, r2.as_fd(), Interest::READ).unwrap(); // unchanged: nothing to do
        assert_eq!(p.len(), 2);
        assert!(ready(&mut p, NOW).is_empty());
        rustix::io::write(&w1, b"ab").unwrap();
        assert_eq!(ready(&mut p, SECOND), vec![1]);
        assert_eq!(ready(&mut p, SECOND), vec![1], "still readable: reported again");
        let mut buf = [0u8; 2];
        rustix::io::read(&r1, &mut buf).unwrap();
        assert!(ready(&mut p, NOW).is_empty(), "read to the end");
        // Write interest on a pipe's write end: writable at once.
        p.set(3, w2.as_fd(), Interest { read: false, write: true }).unwrap();
        assert_eq!(ready(&mut p, SECOND), vec![3]);
        p.set(3, w2.as_fd(), Interest::default()).unwrap();
        assert!(ready(&mut p, NOW).is_empty(), "no interest: not reported");
        p.remove(2, r2.as_fd());
        assert!(!p.contains(2) && !p.is_stale(2), "removed since the last wait: not stale");
        rustix::io::write(&w2, b"x").unwrap();
        assert!(ready(&mut p, NOW).is_empty(), "removed");
        assert!(p.is_stale(2), "a wait later, an event of it would be");
    }

    /// A closed descriptor leaves the set; one whose open file lives on in a duplicate keeps
    /// reporting under its token, which the set no longer knows: stale, and a reset ends it.
    #[test]
    fn a_registration_that_outlives_its_descriptor_is_stale_until_a_reset() {
        let mut p = Poller::new().unwrap();
        let (r, w) = pipe();
        rustix::io::write(&w, b"x").unwrap();
        p.set(7, r.as_fd(), Interest::READ).unwrap();
        drop(r);
        p.forget(7);
        assert!(ready(&mut p, NOW).is_empty(), "closed: out of the set");
        let (r, w) = pipe();
        rustix::io::write(&w, b"x").unwrap();
        let dup = rustix::io::fcntl_dupfd_cloexec(&r, 0).unwrap();
        p.set(8, r.as_fd(), Interest::READ).unwrap();
        drop(r);
        p.forget(8);
        let events = ready(&mut p, SECOND);
        assert_eq!(events, vec![8], "the duplicate keeps the registration alive");
        assert!(p.is_stale(8));
        p.reset().unwrap();
        assert!(ready(&mut p, NOW).is_empty(), "a new set");
        p.set(9, dup.as_fd(), Interest::READ).unwrap();
        assert_eq!(ready(&mut p, SECOND), vec![9]);
    }

    /// A token forgotten with its closed descriptor can name a new one, even at the same number.
    #[test]
    fn a_forgotten_token_can_name_a_new_descriptor() {
        let mut p = Poller::new().unwrap();
        let (mut r, w) = pipe();
        p.set(1, r.as_fd(), Interest::READ).unwrap();
        rustix::io::write(&w, b"x").unwrap();
        // Another pipe's read end at the same number: the first one's is closed by that.
        let (other, w2) = pipe();
        rustix::io::dup2(&other, &mut r).unwrap();
        drop(other);
        assert!(ready(&mut p, NOW).is_empty(), "the closed one left the set");
        p.forget(1);
        p.set(1, r.as_fd(), Interest::READ).unwrap();
        rustix::io::write(&w2, b"x").unwrap();
        assert_eq!(ready(&mut p, SECOND), vec![1]);
    }
}
