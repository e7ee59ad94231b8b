//! The channel between the master and one worker: a unix stream socket pair carrying
//! line-delimited JSON messages. EOF on the worker's end means the master is gone.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

use crate::stats::{ClusterStats, WorkerStats};

/// The longest line either side accepts (a stats answer for `MAX_WORKERS` workers is about
/// 1 MiB); longer input means a broken peer.
pub(crate) const MAX_LINE: usize = 8 << 20;

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

/// A non-blocking unix stream carrying newline-terminated lines, buffered both ways: input
/// until a line is complete, output until the socket takes it. Used for the workers' channels
/// and the control connections.
#[derive(Debug)]
pub(crate) struct LineIo {
    pub(crate) sock: UnixStream,
    inbuf: Vec<u8>,
    /// `inbuf[..scanned]` holds no newline: a long line is scanned once, not at every read.
    scanned: usize,
    outbuf: Vec<u8>,
}

/// What one [`LineIo::read_lines`] found.
#[derive(Debug, Default)]
pub(crate) struct Input {
    /// Complete lines, without their newline.
    pub(crate) lines: Vec<Vec<u8>>,
    /// The peer closed its end (or the socket failed).
    pub(crate) eof: bool,
    /// A line grew past the limit; it was dropped.
    pub(crate) too_long: bool,
}

impl LineIo {
    pub(crate) fn new(sock: UnixStream) -> io::Result<LineIo> {
        sock.set_nonblocking(true)?;
        Ok(LineIo { sock, inbuf: Vec::new(), scanned: 0, outbuf: Vec::new() })
    }

    /// Reads what is available without blocking.
    pub(crate) fn read_lines(&mut self, max_line: usize) -> Input {
        let mut input = Input::default();
        let mut buf = [0u8; 8192];
        loop {
            let read = match self.sock.read(&mut buf) {
                Ok(0) => {
                    input.eof = true;
                    0
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => {
                    input.eof = true;
                    0
                }
            };
            self.inbuf.extend_from_slice(&buf[..read]);
            while let Some(pos) = self.inbuf[self.scanned..].iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.inbuf.drain(..=self.scanned + pos).collect();
                line.pop();
                input.lines.push(line);
                self.scanned = 0;
            }
            self.scanned = self.inbuf.len();
            if self.inbuf.len() > max_line {
                self.inbuf = Vec::new();
                self.scanned = 0;
                input.too_long = true;
                return input;
            }
            if read == 0 {
                return input;
            }
        }
    }

    /// Queues `bytes` (a complete line, newline included) and writes what the socket takes.
    /// An error means the peer is gone.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.outbuf.extend_from_slice(bytes);
        self.flush()
    }

    /// Writes pending output without blocking. An error means the peer is gone.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while !self.outbuf.is_empty() {
            match self.sock.write(&self.outbuf) {
                Ok(n) => {
                    self.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.outbuf.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Output is waiting for the socket to take it.
    pub(crate) fn wants_write(&self) -> bool {
        !self.outbuf.is_empty()
    }
}

/// The master's end of one worker channel.
#[derive(Debug)]
pub(crate) struct MasterEnd {
    pub(crate) io: LineIo,
    /// The worker closed its end (or broke the protocol): stop polling for input.
    pub(crate) closed: bool,
}

impl MasterEnd {
    pub(crate) fn new(sock: UnixStream) -> io::Result<MasterEnd> {
        Ok(MasterEnd { io: LineIo::new(sock)?, closed: false })
    }

    /// Reads what is available and returns the complete messages. Malformed lines are skipped
    /// (and logged); EOF, an error or an oversized line mark the channel closed.
    pub(crate) fn read_messages(&mut self) -> Vec<ToMaster> {
        let input = self.io.read_lines(MAX_LINE);
        if input.too_long {
            tracing::warn!("a worker channel sent a line over {MAX_LINE} bytes; ignoring the channel");
        }
        self.closed |= input.eof || input.too_long;
        input
            .lines
            .iter()
            .filter_map(|line| {
                serde_json::from_slice::<ToMaster>(line)
                    .map_err(|e| tracing::warn!("ignoring a malformed message from a worker: {e}"))
                    .ok()
            })
            .collect()
    }

    /// Queues a message and writes as much as the socket takes now.
    pub(crate) fn send(&mut self, msg: &ToWorker) {
        if !self.closed && self.io.send(&encode(msg)).is_err() {
            self.closed = true;
        }
    }

    /// Writes pending output.
    pub(crate) fn flush(&mut self) {
        if self.io.flush().is_err() {
            self.closed = true;
        }
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
        for _ in 0..(2 * MAX_LINE / chunk.len()) {
            let _ = b.write(&chunk);
            end.read_messages();
            if end.closed {
                break;
            }
        }
        assert!(end.closed);
    }
}
