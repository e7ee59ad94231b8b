//! The worker's channel reader: dispatches the master's replies and notices the master's death.
//!
//! It reads on a thread of its own, started when something first needs it
//! ([`Inner::ensure_reader`](super::Inner)), or, in `serve`, as a task of the worker's runtime:
//! a worker that only serves then stays a single-threaded process (glibc skips the locks of
//! `malloc` and the cancellation bookkeeping of every `recv`/`writev` in a process that never
//! started a thread: a standalone `axum::serve` with one parked thread beside it served 0.974× of
//! itself, measured by hand in alternated `wrk` runs; see ARCHITECTURE.md).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Inner;
use crate::proto::channel::{MAX_LINE, ToWorker};

/// Decodes one message from the master. A panic while decoding (a value out of range for the
/// platform's types) is a malformed message like any other: the reader must survive it, since
/// it is the one that notices the master's death.
fn decode(line: &[u8]) -> Result<ToWorker, String> {
    match std::panic::catch_unwind(|| serde_json::from_slice::<ToWorker>(line)) {
        Ok(decoded) => decoded.map_err(|e| e.to_string()),
        Err(_) => Err("a value is out of range".to_owned()),
    }
}

/// Cuts what the master sends into lines (without their `\n`), whatever the reads' sizes. A
/// line of `MAX_LINE` bytes or more (with its `\n`: longer than any message we expect) is
/// skipped with a warning, a bounded piece at a time, and the reader keeps listening.
#[derive(Debug, Default)]
pub(super) struct Lines {
    partial: Vec<u8>,
    skipping: bool,
}

impl Lines {
    /// Feeds bytes read from the channel; `each` gets every line they complete.
    pub(super) fn feed(&mut self, mut data: &[u8], mut each: impl FnMut(&[u8])) {
        while let Some(i) = data.iter().position(|b| *b == b'\n') {
            let (head, rest) = (&data[..i], &data[i + 1..]);
            data = rest;
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            if self.partial.len() + head.len() >= MAX_LINE {
                tracing::warn!("skipping a message from the master longer than {MAX_LINE} bytes");
                self.partial.clear();
            } else if self.partial.is_empty() {
                each(head);
            } else {
                self.partial.extend_from_slice(head);
                each(&self.partial);
                self.partial.clear();
            }
        }
        if self.skipping {
            return;
        }
        if self.partial.len() + data.len() >= MAX_LINE {
            tracing::warn!("skipping a message from the master longer than {MAX_LINE} bytes");
            self.partial.clear();
            self.skipping = true;
        } else {
            self.partial.extend_from_slice(data);
        }
    }
}

impl Inner {
    /// Hands one message of the master to the query waiting for it.
    pub(super) fn dispatch(&self, line: &[u8]) {
        match decode(line) {
            Ok(msg) => {
                let id = match &msg {
                    ToWorker::Stats { id, .. } => *id,
                };
                if let Some(tx) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                    let _ = tx.try_send(msg);
                }
            }
            Err(e) => tracing::warn!("ignoring a malformed message from the master: {e}"),
        }
    }

    /// The channel reached EOF: the master is gone. Tells everyone who waits for it.
    pub(super) fn master_gone(&self) {
        tracing::warn!(worker = self.env.id, "the master is gone; draining and exiting");
        self.channel_broken.store(true, Ordering::SeqCst);
        *self.gone.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.gone_cv.notify_all();
        #[cfg(feature = "tokio")]
        self.gone_tx.send_replace(true);
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Once the master is gone nobody will kill a wedged drain any more: after the shutdown
    /// timeout this ends the process (blocking the calling thread until then).
    pub(super) fn end_after_shutdown_timeout(&self) -> ! {
        std::thread::sleep(self.env.shutdown_timeout);
        tracing::error!(
            worker = self.env.id,
            "still running {:?} after the master went away; exiting",
            self.env.shutdown_timeout
        );
        std::process::exit(1);
    }
}

/// The channel thread: dispatches the master's replies and notices EOF, then ends the process
/// after the shutdown timeout.
pub(super) fn channel_reader(inner: Arc<Inner>, mut stream: UnixStream) {
    // A runtime that read the channel before may have left a line half read.
    let mut lines = std::mem::take(&mut *inner.lines.lock().unwrap_or_else(|e| e.into_inner()));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => lines.feed(&buf[..n], |line| inner.dispatch(line)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    inner.master_gone();
    inner.end_after_shutdown_timeout();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_from_the_master_never_panic() {
        let ok = br#"{"t":"stats","id":7,"cluster":{"total_workers":1,"active_workers":1,"crashed_workers":0,"disabled_workers":0,"shutdown_requested":false,"restart_requested":false,"total_restarts":0,"last_restart":null},"workers":[]}"#;
        assert!(matches!(decode(ok), Ok(ToWorker::Stats { id: 7, .. })));
        // A start time 10^19 s after the epoch: past what `SystemTime` holds, read as unknown.
        let far = br#"{"t":"stats","id":8,"cluster":{"total_workers":1,"active_workers":1,"crashed_workers":0,"disabled_workers":0,"shutdown_requested":false,"restart_requested":false,"total_restarts":0,"last_restart":null},"workers":[{"worker_id":0,"pid":1,"port":1,"status":"active","start_time":1e19,"uptime":0.0,"exit_status":null,"crash_count":0,"respawn_disabled":false}]}"#;
        match decode(far) {
            Ok(ToWorker::Stats { id: 8, workers, .. }) => assert_eq!(workers[0].start_time, None),
            other => panic!("{other:?}"),
        }
        assert!(decode(b"{not json").is_err());
    }

    /// Feeds `chunks` and returns the lines seen.
    fn lines_of(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut lines = Lines::default();
        let mut seen = Vec::new();
        for chunk in chunks {
            lines.feed(chunk, |l| seen.push(l.to_vec()));
        }
        seen
    }

    #[test]
    fn lines_are_whole_whatever_the_reads_and_overlong_ones_are_skipped() {
        assert_eq!(lines_of(&[b"a\nbc", b"d\n", b"\ne\n"]), [&b"a"[..], b"bcd", b"", b"e"]);
        assert_eq!(lines_of(&[b"x", b"y", b"z"]), Vec::<Vec<u8>>::new(), "no line without its end");
        // The longest line read: MAX_LINE bytes with its `\n`, as `read_until` on `take(MAX_LINE)`.
        let longest = vec![b'x'; MAX_LINE - 1];
        assert_eq!(lines_of(&[&longest, b"\nok\n"]), [longest.clone(), b"ok".to_vec()]);
        // One byte more is skipped, in one read or many, and the next line is read.
        let over = vec![b'y'; MAX_LINE];
        assert_eq!(lines_of(&[&over, b"\nok\n"]), [b"ok".to_vec()]);
        assert_eq!(lines_of(&[&over, &over, &over, b"tail\nok\n"]), [b"ok".to_vec()]);
        let mut one = over.clone();
        one.extend_from_slice(b"\nok\n");
        assert_eq!(lines_of(&[&one]), [b"ok".to_vec()]);
        assert_eq!(lines_of(&[&longest[..10], &longest[10..], b"y\nok\n"]), [b"ok".to_vec()]);
    }
}
