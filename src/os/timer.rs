//! A one-shot timer as a descriptor (`timerfd`, `CLOCK_MONOTONIC`), for a worker's heartbeat:
//! polled as one more descriptor of the runtime's epoll set, it keeps the runtime's own timer
//! wheel empty. A tokio runtime with any timer pending sleeps in `epoll_wait` with a timeout,
//! which arms a kernel timer at every sleep (on a virtual machine, a trap to the hypervisor
//! each time), and a busy worker sleeps tens of thousands of times a second; with no timer
//! pending it sleeps without one, and this descriptor wakes it once a heartbeat.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

/// A non-blocking, close-on-exec one-shot timer.
#[derive(Debug)]
pub(crate) struct Timer {
    fd: OwnedFd,
}

impl Timer {
    /// A timer, not armed.
    pub(crate) fn new() -> io::Result<Timer> {
        let fd =
            rustix::time::timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
        Ok(Timer { fd })
    }

    /// Fires once, `after` from now (at least a nanosecond: zero would disarm it).
    pub(crate) fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let value =
            Timespec { tv_sec: after.as_secs().try_into().unwrap_or(i64::MAX), tv_nsec: after.subsec_nanos().into() };
        let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
        rustix::time::timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }

    /// Whether it fired since the last call (and takes the expiry); `WouldBlock` if not.
    pub(crate) fn take(&self) -> io::Result<()> {
        let mut count = [0u8; 8];
        rustix::io::read(&self.fd, &mut count)?;
        Ok(())
    }
}

impl AsFd for Timer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl std::os::fd::AsRawFd for Timer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_fires_once_after_the_delay_and_not_before() {
        let t = Timer::new().unwrap();
        assert_eq!(t.take().unwrap_err().kind(), io::ErrorKind::WouldBlock, "not armed: nothing to take");
        let armed = std::time::Instant::now();
        // Long enough that a test thread descheduled between the two calls still sees it unfired.
        t.arm(Duration::from_millis(300)).unwrap();
        assert_eq!(t.take().unwrap_err().kind(), io::ErrorKind::WouldBlock, "not yet");
        let mut fds = [rustix::event::PollFd::new(&t, rustix::event::PollFlags::IN)];
        let timeout = rustix::time::Timespec { tv_sec: 5, tv_nsec: 0 };
        assert_eq!(rustix::event::poll(&mut fds, Some(&timeout)).unwrap(), 1);
        assert!(armed.elapsed() >= Duration::from_millis(300));
        t.take().unwrap();
        assert_eq!(t.take().unwrap_err().kind(), io::ErrorKind::WouldBlock, "one-shot: fired once");
    }
}
