//! systemd's readiness protocol (`sd_notify`) for `Type=notify` services: the master, and only
//! the master, tells systemd when the cluster is ready, reloading or stopping. Workers never see
//! `NOTIFY_SOCKET` (the master removes it from their environment).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use crate::supervisor::Watchdog;

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub(crate) struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// With `WATCHDOG_USEC` set for this process: how often to send `WATCHDOG=1` (half the
    /// interval systemd allows), and when next.
    watchdog: Option<(Duration, Instant)>,
    /// The last send failed (logged once, until one succeeds again).
    failing: bool,
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace), if set.
    pub(crate) fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => SocketAddr::from_pathname(&path),
        };
        let watchdog = watchdog_interval().map(|every| (every, Instant::now()));
        let sock = UnixDatagram::unbound().and_then(|s| {
            // Never block the master's loop on a reader that stopped reading: drop instead.
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let result = addr.and_then(|addr| Ok(Notifier { sock: sock?, addr, watchdog, failing: false }));
        match result {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={}: {e}; not notifying systemd", path.to_string_lossy());
                None
            }
        }
    }

    /// Sends one notification (`KEY=VALUE` lines). A failure is logged, never fatal.
    pub(crate) fn send(&mut self, message: &str) {
        match self.sock.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(_) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!("cannot notify systemd: {e} (further failures are not logged until one succeeds)");
            }
            Err(e) => tracing::debug!("cannot notify systemd: {e}"),
        }
    }

    /// When the next `WATCHDOG=1` is due, if the watchdog is on.
    pub(crate) fn watchdog_due(&self) -> Option<Instant> {
        self.watchdog.map(|(_, due)| due)
    }

    /// When the keep-alive is due, says what the supervisor's `verdict` is: `WATCHDOG=1`, or
    /// nothing (an unhealthy cluster stays silent, so that systemd restarts it). The next one
    /// is due an interval later in every case.
    pub(crate) fn watchdog(&mut self, now: Instant, verdict: Watchdog) {
        let Some((every, due)) = self.watchdog else { return };
        if now < due {
            return;
        }
        self.watchdog = Some((every, now + every));
        match verdict {
            Watchdog::Feed => self.send("WATCHDOG=1"),
            Watchdog::Withhold { reason } => {
                tracing::warn!("{reason}: not telling systemd's watchdog that all is well")
            }
            Watchdog::Quiet => {}
        }
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` systemd requires alongside it.
    pub(crate) fn reloading(&mut self, status: &str) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status}"));
    }
}

/// Half of `WATCHDOG_USEC`, when it is set for this process (`WATCHDOG_PID` absent or ours).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}
