//! Descriptors a process inherited at fixed numbers (a worker's listener and channel, a
//! socket-activated master's sockets): claimed once per process, so they never get two owners.

use std::sync::atomic::{AtomicBool, Ordering};

static CLAIMED: AtomicBool = AtomicBool::new(false);

/// True the first time it is called in this process, false after: whoever gets `true` may take
/// ownership of the inherited descriptors.
pub(crate) fn claim_inherited_fds() -> bool {
    !CLAIMED.swap(true, Ordering::SeqCst)
}

/// Raises the soft limit of open descriptors to the hard limit (as Go and nginx's
/// `worker_rlimit_nofile` do): the master needs about three per worker, and servers need many.
/// Workers inherit it.
pub(crate) fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (limit.current, limit.maximum)
        && cur < max
    {
        let raised = rustix::process::Rlimit { current: Some(max.min(1 << 20)), maximum: Some(max) };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!("raised the open-file limit from {cur} to {}", max.min(1 << 20)),
            Err(e) => tracing::debug!("cannot raise the open-file limit from {cur}: {e}"),
        }
    }
}
