//! The private `NOTIFY_SOCKET` of a [`Cluster::command`](crate::Cluster::command) cluster: the
//! master's own datagram socket, where the workers (programs that do not link this library)
//! say what systemd's `sd_notify` would tell systemd: `READY=1`, `WATCHDOG=1`, `STATUS=…`,
//! `STOPPING=1`.
//!
//! Who sent a datagram is known from the kernel (`SO_PASSCRED`: the sender's pid cannot be
//! forged by an unprivileged process), so the driver can map it to a worker. A datagram without
//! credentials, larger than [`MAX_DATAGRAM`], or not UTF-8 is dropped whole. The socket file
//! lives in the user's private control directory (0700), so only this user can reach it.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};

use crate::error::Error;

/// The longest notification taken (systemd's own limit is about this).
pub(crate) const MAX_DATAGRAM: usize = 4096;

/// Datagrams taken per call: a flood cannot hold the master's loop.
const MAX_PER_CALL: usize = 64;

/// One thing a worker said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notification {
    /// `READY=1`.
    Ready,
    /// `WATCHDOG=1`.
    Watchdog,
    /// `STOPPING=1`.
    Stopping,
    /// `STATUS=…`.
    Status(String),
}

/// Parses one datagram: `KEY=VALUE` lines; unknown keys are ignored, as systemd does.
pub(crate) fn parse(datagram: &str) -> Vec<Notification> {
    datagram
        .lines()
        .filter_map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Some(Notification::Ready),
            Some(("WATCHDOG", "1")) => Some(Notification::Watchdog),
            Some(("STOPPING", "1")) => Some(Notification::Stopping),
            Some(("STATUS", text)) => Some(Notification::Status(text.chars().take(256).collect())),
            _ => None,
        })
        .collect()
}

/// The master's notification socket.
#[derive(Debug)]
pub(crate) struct WorkerNotify {
    sock: UnixDatagram,
    path: PathBuf,
    /// Device and inode of the file we created (so that only our own is ever unlinked).
    id: (u64, u64),
}

impl WorkerNotify {
    /// Binds the socket at `path` (its directory is created 0700 if missing; a file left there
    /// by a dead master is replaced): non-blocking, close-on-exec, receiving credentials.
    pub(crate) fn bind(path: &Path) -> Result<WorkerNotify, Error> {
        let fail = |reason: String| Error::Io {
            context: "cannot create the workers' notification socket",
            source: io::Error::other(format!("{}: {reason}", path.display())),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| fail(e.to_string()))?;
        }
        // A datagram socket cannot tell whether another master still uses the file: the name
        // carries the master's pid, so a file of that name is a dead master's.
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path).map_err(|e| fail(e.to_string()))?;
        sock.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        rustix::net::sockopt::set_socket_passcred(&sock, true).map_err(|e| fail(e.to_string()))?;
        let meta = std::fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
        Ok(WorkerNotify { sock, path: path.to_owned(), id: (meta.dev(), meta.ino()) })
    }

    /// Where the socket is (the workers' `NOTIFY_SOCKET`).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The socket, to poll for input.
    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Takes the datagrams waiting (at most [`MAX_PER_CALL`]): each sender's pid with what it
    /// said. Dropped: datagrams without credentials, truncated ones, ones that are not UTF-8.
    pub(crate) fn receive(&mut self) -> Vec<(u32, Vec<Notification>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for _ in 0..MAX_PER_CALL {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = rustix::net::recvmsg(
                &self.sock,
                &mut [io::IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::DONTWAIT | RecvFlags::TRUNC | RecvFlags::CMSG_CLOEXEC,
            );
            let msg = match received {
                Ok(msg) => msg,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break, // EAGAIN: nothing more
            };
            let pid = control.drain().find_map(|m| match m {
                RecvAncillaryMessage::ScmCredentials(cred) => Some(cred.pid.as_raw_nonzero().get() as u32),
                _ => None,
            });
            if msg.bytes > buf.len() || msg.flags.contains(ReturnFlags::TRUNC) {
                tracing::warn!("ignored a notification of {} bytes (over {MAX_DATAGRAM})", msg.bytes);
                continue;
            }
            let (Some(pid), Ok(text)) = (pid, std::str::from_utf8(&buf[..msg.bytes])) else {
                tracing::debug!("ignored a notification without credentials or not in UTF-8");
                continue;
            };
            out.push((pid, parse(text)));
        }
        out
    }
}

impl Drop for WorkerNotify {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The parent of `pid` (from `/proc/PID/stat`), if it is readable.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_are_parsed_as_systemd_does() {
        assert_eq!(
            parse("READY=1\nSTATUS=serving 3 clients\nMAINPID=1\nWATCHDOG=1\nSTOPPING=1\nREADY=0"),
            vec![
                Notification::Ready,
                Notification::Status("serving 3 clients".into()),
                Notification::Watchdog,
                Notification::Stopping
            ]
        );
        assert!(parse("garbage\n\n=\nREADY").is_empty());
        let long = format!("STATUS={}", "x".repeat(1000));
        assert_eq!(parse(&long), vec![Notification::Status("x".repeat(256))]);
    }

    #[test]
    fn datagrams_come_with_their_senders_pid_and_oversized_ones_are_dropped() {
        let dir = std::env::temp_dir().join(format!("ecewo-notify-test-{}", std::process::id()));
        let path = dir.join("sub").join("w.notify");
        let mut n = WorkerNotify::bind(&path).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        client.send_to(&vec![b'x'; MAX_DATAGRAM + 10], &path).unwrap();
        client.send_to(&[0xff, 0xfe], &path).unwrap();
        client.send_to(b"STATUS=up", &path).unwrap();
        let got = n.receive();
        let me = std::process::id();
        assert_eq!(got, vec![(me, vec![Notification::Ready]), (me, vec![Notification::Status("up".into())])]);
        assert!(n.receive().is_empty());
        assert_eq!(parent_of(me), Some(rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32)));
        drop(n);
        assert!(!path.exists(), "its file is removed with it");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
