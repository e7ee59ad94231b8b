//! The I/O side of `top`, in threads that send [`Msg`]s to the loop: the poller (every request
//! to the control socket: `status` each interval, and the actions), the terminal's input, and
//! the signals that end the view.

use std::io::Read as _;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime};

use ecewo_cluster::Signal;
use ecewo_cluster::control::{Client, Request, Response, Status};
use ratatui::crossterm::event::{self, Event, KeyEvent};

use super::events::EventFeed;
use super::model::{Action, Update};

/// What the loop is woken with.
#[derive(Debug)]
pub(crate) enum Msg {
    Key(KeyEvent),
    /// The terminal was resized (or anything else that needs a new frame).
    Redraw,
    Update(Update),
    /// One of the signals that end the view arrived (its number).
    Signal(i32),
    /// The terminal's input cannot be read any more.
    InputFailed(String),
}

/// One `status` request on a fresh connection: whoever listens on the socket now answers (a
/// connection kept open would go on talking to a master that handed the socket over).
pub(crate) fn status(socket: &Path, timeout: Duration) -> Result<Box<Status>, String> {
    match Client::connect(socket, timeout).and_then(|mut c| c.request(&Request::Status)) {
        Ok(Response::Status(status)) => Ok(status),
        Ok(other) => Err(format!("the master answered something unexpected: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Starts the poller: `status` every `interval` (the first one `interval` from now) and at once
/// after each action, reported on `tx` with the event feed's lines; actions come in on the
/// returned sender, one at a time, in order. It ends when either channel closes.
pub(crate) fn spawn_poller(
    socket: PathBuf,
    timeout: Duration,
    interval: Duration,
    mut feed: EventFeed,
    tx: Sender<Msg>,
) -> Sender<Action> {
    let (actions, rx) = mpsc::channel::<Action>();
    std::thread::Builder::new()
        .name("top-poller".into())
        .spawn(move || {
            let mut next_poll = Instant::now() + interval;
            loop {
                let update = match rx.recv_timeout(next_poll.saturating_duration_since(Instant::now())) {
                    Ok(action) => {
                        let result = perform(&socket, timeout, &action);
                        // The next poll shows what the action changed.
                        next_poll = Instant::now();
                        Update::Done { action, result, wall: SystemTime::now() }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        next_poll = Instant::now() + interval;
                        match status(&socket, timeout) {
                            Ok(status) => {
                                let wall = SystemTime::now();
                                let events = feed.next(&socket, timeout, &status, wall);
                                Update::Status { status, at: Instant::now(), wall, events }
                            }
                            Err(error) => Update::Unreachable { error, wall: SystemTime::now() },
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                if tx.send(Msg::Update(update)).is_err() {
                    return;
                }
            }
        })
        .expect("start the poller thread");
    actions
}

/// Carries out one action: what happened, or why not (one sentence each).
fn perform(socket: &Path, timeout: Duration, action: &Action) -> Result<String, String> {
    let request = match action {
        Action::Restart => Request::Restart { wait: false },
        Action::Scale { workers } => Request::Scale { workers: *workers },
        &Action::SignalWorker { slot, pid, master, signal } => return signal_worker(slot, pid, master, signal),
    };
    let answer = Client::connect(socket, timeout).and_then(|mut c| c.request(&request)).map_err(|e| e.to_string())?;
    match answer {
        Response::RestartStarted => {
            Ok("rolling restart started: one worker at a time (the header shows its progress)".into())
        }
        Response::Scaling { workers } => Ok(format!("scaling to {workers} workers")),
        other => Err(format!("the master answered something unexpected: {other:?}")),
    }
}

/// Sends `signal` to the worker `pid` of slot `slot`, only if it is still a child of `master`
/// (pids are reused). The check and the signal go through a pidfd, so the signal reaches the
/// process that was checked or nobody: the pidfd is opened first, the parent read from
/// `/proc/PID/stat` next, and the pidfd polled last: a process that has not exited by then still
/// holds its pid, so the `/proc` entry read was its own.
pub(crate) fn signal_worker(slot: usize, pid: u32, master: u32, signal: Signal) -> Result<String, String> {
    use rustix::process::{Pid, PidfdFlags, pidfd_open, pidfd_send_signal};
    let who = format!("worker {slot} (pid {pid})");
    let gone = || format!("{who} has exited; nothing was sent");
    let sig = rustix::process::Signal::from_named_raw(signal.as_raw())
        .ok_or_else(|| format!("top sends named signals only; send {signal} with `kill -{} {pid}`", signal.as_raw()))?;
    let raw = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or_else(|| format!("{pid} is not a pid"))?;
    let pidfd = pidfd_open(raw, PidfdFlags::empty())
        .map_err(|e| if e == rustix::io::Errno::SRCH { gone() } else { format!("cannot reach {who}: {e}") })?;
    match parent_of(pid) {
        Some(parent) if parent == master => {}
        Some(parent) => {
            return Err(format!(
                "pid {pid} is no longer a worker of master {master} (its parent is {parent}); nothing was sent"
            ));
        }
        None => return Err(gone()),
    }
    if exited(&pidfd) {
        return Err(gone());
    }
    pidfd_send_signal(&pidfd, sig).map_err(|e| {
        if e == rustix::io::Errno::SRCH { gone() } else { format!("cannot send {signal} to {who}: {e}") }
    })?;
    Ok(format!("sent {signal} to {who}"))
}

/// The parent of a live process, from `/proc/PID/stat`; `None` if it is gone or a zombie.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    if state.starts_with(['Z', 'X']) {
        return None;
    }
    fields.next()?.parse().ok()
}

/// Whether the process of a pidfd has exited (the pidfd is then readable).
fn exited(pidfd: &impl AsFd) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    // Zero timeout: a look, not a wait.
    matches!(poll(&mut fds, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(n) if n > 0)
}

/// Reads the terminal's input in a thread: keys, and resizes as [`Msg::Redraw`].
pub(crate) fn spawn_input(tx: Sender<Msg>) {
    std::thread::Builder::new()
        .name("top-input".into())
        .spawn(move || {
            loop {
                let msg = match event::read() {
                    Ok(Event::Key(key)) => Msg::Key(key),
                    Ok(Event::Resize(..)) => Msg::Redraw,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Msg::InputFailed(format!("cannot read the terminal: {e}")));
                        return;
                    }
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        })
        .expect("start the input thread");
}

/// Turns SIGTERM, SIGHUP and SIGINT into [`Msg::Signal`], so the loop restores the terminal
/// before the process ends (in raw mode Ctrl-C is a key; these come from `kill` or a closed
/// terminal).
///
/// # Errors
///
/// When the handlers cannot be installed.
pub(crate) fn spawn_signals(tx: Sender<Msg>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let (mut read, write) = UnixStream::pair()?;
    let which = Arc::new(AtomicUsize::new(0));
    for sig in [SIGTERM, SIGHUP, SIGINT] {
        // In order: the number first, then the wake-up.
        signal_hook::flag::register_usize(sig, which.clone(), sig as usize)?;
        signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
    }
    std::thread::Builder::new().name("top-signals".into()).spawn(move || {
        let mut byte = [0u8; 1];
        while let Ok(1) = read.read(&mut byte) {
            if tx.send(Msg::Signal(which.load(Ordering::SeqCst) as i32)).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_worker_checks_the_parent() {
        // This test process is not a child of pid 1 in every sandbox, but it is never its own
        // parent: the check refuses, and nothing is sent.
        let me = std::process::id();
        let err = signal_worker(0, me, me, Signal::TERM).unwrap_err();
        assert!(err.contains("is no longer a worker of master"), "{err}");
        let parent = parent_of(me).unwrap();
        assert_ne!(parent, me);
        // A real child of ours gets the signal.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let said = signal_worker(3, child.id(), me, Signal::KILL);
        // Never left running, whatever the answer.
        let _ = child.kill();
        let status = child.wait().unwrap();
        assert_eq!(said, Ok(format!("sent SIGKILL to worker 3 (pid {})", child.id())));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
        // Reaped: gone.
        let err = signal_worker(3, child.id(), me, Signal::KILL).unwrap_err();
        assert!(err.contains("nothing was sent"), "{err}");
    }
}
