//! Where the master's loop takes each batch of the event history's entries (beside the control
//! socket's streams): the copy [`MasterHandle`](crate::MasterHandle)s read ([`EventMirror`]),
//! and the event log file (`Cluster::event_log`, [`EventLog`]): every entry appended as one
//! JSON line.
//!
//! - **One write per batch.** The entries of one supervisor decision are written with one
//!   `write` on a file opened `O_APPEND`: lines are never interleaved with another writer's
//!   (two masters of an upgrade append to the same file), and the loop spends one system call
//!   on them. A regular file's write cannot be made non-blocking; on a local disk it lands in
//!   the page cache in microseconds. (A log on a network file system that stalls would hold the
//!   loop: keep it local.)
//! - **Rotation.** Before each batch the path is checked (`stat`): when it no longer names the
//!   file we hold (logrotate moved it away, or it was deleted), the path is opened again,
//!   created if missing. No signal is needed, and `copytruncate` works too (appends go to the
//!   end of the truncated file).
//! - **Errors** (a full disk, a removed directory) are logged once, with the path; the entries
//!   of that batch are lost, later batches try again (and their success is logged). A batch
//!   cut short leaves a partial line: the next write begins with a newline, so every other line
//!   stays whole.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::events::ClusterEvent;

/// The event history as handles read it: the loop's copy of the supervisor's ring, kept
/// up to date batch by batch (other threads cannot reach the supervisor).
#[derive(Debug)]
pub(crate) struct EventMirror {
    capacity: usize,
    entries: std::collections::VecDeque<ClusterEvent>,
}

impl EventMirror {
    pub(crate) fn new(capacity: usize) -> EventMirror {
        EventMirror { capacity, entries: std::collections::VecDeque::new() }
    }

    /// Adds a batch, keeping the last `capacity` entries.
    pub(crate) fn extend(&mut self, batch: &[ClusterEvent]) {
        let skip = batch.len().saturating_sub(self.capacity);
        self.entries.extend(batch[skip..].iter().cloned());
        let over = self.entries.len().saturating_sub(self.capacity);
        self.entries.drain(..over);
    }

    /// The entries kept whose sequence number is after `seq` (all with `None`), oldest first.
    pub(crate) fn since(&self, seq: Option<u64>) -> Vec<ClusterEvent> {
        let after = seq.unwrap_or(0);
        let start = self.entries.partition_point(|e| e.seq <= after);
        self.entries.range(start..).cloned().collect()
    }
}

/// The event log file.
#[derive(Debug)]
pub(crate) struct EventLog {
    path: PathBuf,
    /// The open file and its device and inode (`None`: opening it again failed).
    file: Option<(File, (u64, u64))>,
    /// An error was logged and nothing worked since.
    failing: bool,
    /// The last write may have stopped in the middle of a line.
    torn: bool,
}

fn open(path: &Path) -> std::io::Result<(File, (u64, u64))> {
    let file = std::fs::OpenOptions::new().append(true).create(true).mode(0o640).open(path)?;
    let meta = file.metadata()?;
    Ok((file, (meta.dev(), meta.ino())))
}

impl EventLog {
    /// Opens (or creates) the file at `path` for appending.
    ///
    /// # Errors
    ///
    /// The error of opening it, for `init` to report.
    pub(crate) fn open(path: &Path) -> std::io::Result<EventLog> {
        Ok(EventLog { path: path.to_owned(), file: Some(open(path)?), failing: false, torn: false })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `entries`, one JSON line each (see the [module documentation](self)).
    pub(crate) fn append(&mut self, entries: &[ClusterEvent]) {
        if entries.is_empty() {
            return;
        }
        let result = self.reopen_if_moved().and_then(|()| {
            let mut batch = Vec::with_capacity(entries.len() * 256);
            if self.torn {
                batch.push(b'\n');
            }
            for e in entries {
                batch.extend_from_slice(&e.to_json_line());
            }
            let (file, _) = self.file.as_mut().expect("opened");
            file.write_all(&batch)
        });
        match result {
            Ok(()) => {
                self.torn = false;
                if std::mem::take(&mut self.failing) {
                    tracing::info!("event log {}: writing again", self.path.display());
                }
            }
            Err(e) => {
                self.torn = true;
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(
                        "event log {}: {e}; events are not logged until it works again (the history and `ecewo-cluster events` still have them)",
                        self.path.display()
                    );
                }
            }
        }
    }

    /// Makes sure the file held is the one the path names: opens the path again if it names
    /// another file now (or none).
    fn reopen_if_moved(&mut self) -> std::io::Result<()> {
        let current = std::fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        let held = self.file.as_ref().map(|(_, id)| *id);
        if held.is_none() || current != held {
            if held.is_some() {
                tracing::info!("event log {}: the file was moved or removed; opening it again", self.path.display());
            }
            self.file = None;
            self.file = Some(open(&self.path)?);
            // A new file starts with whole lines.
            self.torn = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::events::EventKind;

    fn entry(seq: u64) -> ClusterEvent {
        ClusterEvent::new(seq, SystemTime::now(), 1, Some(0), Some(100 + seq as u32), EventKind::Ready)
    }

    fn seqs(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<ClusterEvent>(l).expect("a whole JSON line").seq)
            .collect()
    }

    #[test]
    fn the_mirror_keeps_the_last_entries() {
        let mut m = EventMirror::new(3);
        m.extend(&[entry(1), entry(2)]);
        m.extend(&[entry(3), entry(4), entry(5), entry(6), entry(7)]);
        let seqs = |v: Vec<ClusterEvent>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(m.since(None)), vec![5, 6, 7]);
        assert_eq!(seqs(m.since(Some(5))), vec![6, 7]);
        assert_eq!(seqs(m.since(Some(1))), vec![5, 6, 7]);
        assert!(m.since(Some(7)).is_empty());
        let mut off = EventMirror::new(0);
        off.extend(&[entry(1)]);
        assert!(off.since(None).is_empty());
    }

    #[test]
    fn lines_are_appended_and_a_rotated_file_is_opened_again() {
        let dir = tempfile_dir("rotate");
        let path = dir.join("events.jsonl");
        std::fs::write(&path, "").unwrap();
        let mut log = EventLog::open(&path).unwrap();
        log.append(&[entry(1), entry(2)]);
        log.append(&[entry(3)]);
        assert_eq!(seqs(&path), vec![1, 2, 3]);
        // logrotate's default: the file is renamed, the next batch goes to a new one.
        std::fs::rename(&path, dir.join("events.jsonl.1")).unwrap();
        log.append(&[entry(4)]);
        assert_eq!(seqs(&dir.join("events.jsonl.1")), vec![1, 2, 3]);
        assert_eq!(seqs(&path), vec![4]);
        // Removed: created again.
        std::fs::remove_file(&path).unwrap();
        log.append(&[entry(5)]);
        assert_eq!(seqs(&path), vec![5]);
        // copytruncate: appends go on at the (new) end.
        std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        log.append(&[entry(6)]);
        assert_eq!(seqs(&path), vec![6]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_error_is_survived_and_the_next_lines_are_whole() {
        let dir = tempfile_dir("error");
        let path = dir.join("events.jsonl");
        let mut log = EventLog::open(&path).unwrap();
        log.append(&[entry(1)]);
        // The directory goes away: the batch is lost, the loop goes on.
        std::fs::remove_dir_all(&dir).unwrap();
        log.append(&[entry(2)]);
        assert!(log.failing && log.file.is_none());
        std::fs::create_dir_all(&dir).unwrap();
        log.append(&[entry(3)]);
        assert!(!log.failing);
        assert_eq!(seqs(&path), vec![3]);
        // A torn line (as a write cut short leaves it) is ended before the next batch.
        log.torn = true;
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"seq\":").unwrap();
        log.append(&[entry(4)]);
        let text = std::fs::read_to_string(&path).unwrap();
        let whole: Vec<u64> =
            text.lines().filter_map(|l| serde_json::from_str::<ClusterEvent>(l).ok()).map(|e| e.seq).collect();
        assert_eq!(whole, vec![3, 4], "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ecewo-cluster-event-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
