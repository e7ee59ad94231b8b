//! The master's end of one worker channel: typed messages over [`LineIo`].

use std::io;
use std::os::unix::net::UnixStream;

use crate::proto::channel::{MAX_LINE, ToMaster, ToWorker, encode};
use crate::proto::line::LineIo;

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
    use std::io::Write;

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
