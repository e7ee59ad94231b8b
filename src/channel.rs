//! The channel between the master and one worker: a unix stream socket pair carrying
//! line-delimited JSON messages. EOF on the worker's end means the master is gone.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

use crate::stats::{ClusterStats, WorkerStats};

/// The longest line either side accepts; longer input means a broken peer.
pub(crate) const MAX_LINE: usize = 1 << 20;

/// Messages from a worker to its master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum ToMaster {
    /// The worker accepts connections.
    Ready,
    /// The worker asks for the cluster's statistics; the reply carries the same id.
    Stats { id: u64 },
}

/// Messages from the master to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum ToWorker {
    /// The answer to [`ToMaster::Stats`].
    Stats { id: u64, cluster: ClusterStats, workers: Vec<WorkerStats> },
}

/// Encodes one message as a JSON line.
pub(crate) fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).expect("channel messages always serialize");
    line.push(b'\n');
    line
}

/// The master's end of one worker channel: non-blocking, with an input buffer for partial lines
/// and an output buffer for replies the socket could not take at once.
#[derive(Debug)]
pub(crate) struct MasterEnd {
    pub(crate) sock: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// The worker closed its end (or broke the protocol): stop polling for input.
    pub(crate) closed: bool,
}

impl MasterEnd {
    pub(crate) fn new(sock: UnixStream) -> io::Result<MasterEnd> {
        sock.set_nonblocking(true)?;
        Ok(MasterEnd { sock, inbuf: Vec::new(), outbuf: Vec::new(), closed: false })
    }

    /// Reads what is available and returns the complete messages. Malformed lines are skipped
    /// (and logged); EOF, an error or an oversized line mark the channel closed.
    pub(crate) fn read_messages(&mut self) -> Vec<ToMaster> {
        let mut buf = [0u8; 4096];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
            if self.inbuf.len() > MAX_LINE {
                tracing::warn!("worker channel sent a line over {MAX_LINE} bytes; ignoring the channel");
                self.closed = true;
                self.inbuf.clear();
                break;
            }
        }
        let mut msgs = Vec::new();
        while let Some(pos) = self.inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.inbuf.drain(..=pos).collect();
            match serde_json::from_slice::<ToMaster>(&line[..pos]) {
                Ok(m) => msgs.push(m),
                Err(e) => tracing::warn!("ignoring a malformed message from a worker: {e}"),
            }
        }
        msgs
    }

    /// Queues a message and writes as much as the socket takes now.
    pub(crate) fn send(&mut self, msg: &ToWorker) {
        if self.closed {
            return;
        }
        self.outbuf.extend_from_slice(&encode(msg));
        self.flush();
    }

    /// Writes pending output; returns true if some remains (poll for writability).
    pub(crate) fn flush(&mut self) -> bool {
        while !self.outbuf.is_empty() {
            match self.sock.write(&self.outbuf) {
                Ok(n) => {
                    self.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.outbuf.clear();
                    self.closed = true;
                }
            }
        }
        !self.outbuf.is_empty()
    }

    pub(crate) fn wants_write(&self) -> bool {
        !self.outbuf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_in_pieces_and_garbage_is_skipped() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut end = MasterEnd::new(a).unwrap();
        let ready = encode(&ToMaster::Ready);
        b.write_all(&ready[..3]).unwrap();
        assert!(end.read_messages().is_empty());
        b.write_all(&ready[3..]).unwrap();
        b.write_all(b"{not json}\n").unwrap();
        b.write_all(&encode(&ToMaster::Stats { id: 7 })).unwrap();
        assert_eq!(end.read_messages(), vec![ToMaster::Ready, ToMaster::Stats { id: 7 }]);
        assert!(!end.closed);
        drop(b);
        assert!(end.read_messages().is_empty());
        assert!(end.closed);
    }

    #[test]
    fn an_endless_line_closes_the_channel() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut end = MasterEnd::new(a).unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..40 {
            let _ = b.write(&chunk);
            end.read_messages();
            if end.closed {
                break;
            }
        }
        assert!(end.closed);
    }
}
