//! The operating-system layer: system calls, sockets, CPU detection, `/proc` readings, the
//! master loop's epoll set and the workers' heartbeat timer.
//!
//! Everything here is mechanism without policy: it knows nothing of slots, rollouts or the
//! master's loop. [`sys`] is the one module of the crate allowed to use `unsafe`.

pub(crate) mod cpu;
pub(crate) mod epoll;
pub(crate) mod fds;
pub(crate) mod procfs;
pub(crate) mod socket;
#[allow(unsafe_code)]
pub(crate) mod sys;
#[cfg(feature = "tokio")]
pub(crate) mod timer;
