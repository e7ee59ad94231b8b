//! Newline-delimited framing over a non-blocking unix stream, buffered both ways: used by the
//! master for the workers' channels and the control connections.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// A non-blocking unix stream carrying newline-terminated lines, buffered both ways: input
/// until a line is complete, output until the socket takes it. Used for the workers' channels
/// and the control connections.
#[derive(Debug)]
pub(crate) struct LineIo {
    pub(crate) sock: UnixStream,
    inbuf: Vec<u8>,
    /// `inbuf[..scanned]` holds no newline: a long line is scanned once, not at every read.
    scanned: usize,
    /// Output not yet written: `outbuf[out_start..]` (written bytes are dropped in bulk, not
    /// moved at every write).
    outbuf: Vec<u8>,
    out_start: usize,
}

/// The most bytes one [`LineIo::read_lines`] call reads.
pub(crate) const READ_BUDGET: usize = 64 * 1024;

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
        Ok(LineIo { sock, inbuf: Vec::new(), scanned: 0, outbuf: Vec::new(), out_start: 0 })
    }

    /// Reads what is available without blocking, but at most [`READ_BUDGET`] bytes per call,
    /// so that a peer writing as fast as it can neither holds the master's loop nor fills its
    /// memory: what is left stays in the socket, and `poll` reports it again.
    pub(crate) fn read_lines(&mut self, max_line: usize) -> Input {
        let mut input = Input::default();
        let mut buf = [0u8; 8192];
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                return input;
            }
            let want = buf.len().min(budget);
            let read = match self.sock.read(&mut buf[..want]) {
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
            budget -= read;
            self.inbuf.extend_from_slice(&buf[..read]);
            // Every complete line, then one drain of what they took (not a move per line).
            let mut start = 0;
            let mut from = self.scanned;
            while let Some(pos) = self.inbuf[from..].iter().position(|&b| b == b'\n') {
                input.lines.push(self.inbuf[start..from + pos].to_vec());
                start = from + pos + 1;
                from = start;
            }
            self.inbuf.drain(..start);
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
        let result = loop {
            if self.out_start == self.outbuf.len() {
                break Ok(());
            }
            match self.sock.write(&self.outbuf[self.out_start..]) {
                Ok(n) => self.out_start += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => {
                    self.outbuf = Vec::new();
                    self.out_start = 0;
                    return Err(e);
                }
            }
        };
        if self.out_start == self.outbuf.len() {
            self.outbuf.clear();
            self.out_start = 0;
        } else if self.out_start > self.outbuf.len() / 2 {
            // Most of it is written: move the rest to the front (amortised: at most once per
            // half of the buffer written).
            self.outbuf.drain(..self.out_start);
            self.out_start = 0;
        }
        result
    }

    /// Output is waiting for the socket to take it.
    pub(crate) fn wants_write(&self) -> bool {
        self.pending_output() > 0
    }

    /// How many bytes of output are waiting for the socket to take them.
    pub(crate) fn pending_output(&self) -> usize {
        self.outbuf.len() - self.out_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_the_socket_cannot_take_waits_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut io = LineIo::new(a).unwrap();
        let line: Vec<u8> = (0..1000).map(|i| b'a' + (i % 26) as u8).chain([b'\n']).collect();
        let mut sent = 0;
        // Far more than the socket buffers hold.
        while io.pending_output() < (4 << 20) {
            io.send(&line).unwrap();
            sent += 1;
        }
        assert!(io.wants_write());
        let mut received = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        b.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        while received.len() < sent * line.len() {
            io.flush().unwrap();
            let n = b.read(&mut buf).unwrap();
            received.extend_from_slice(&buf[..n]);
        }
        assert_eq!(io.pending_output(), 0);
        assert!(!io.wants_write());
        assert!(received.chunks(line.len()).all(|c| c == line.as_slice()), "every line whole and in order");
        drop(b);
        assert!(io.send(&line).is_err(), "the peer is gone");
        assert_eq!(io.pending_output(), 0);
    }

    /// A peer that writes as fast as it can: each call reads at most the budget, and together
    /// they still get every line, in order.
    #[test]
    fn a_flooding_peer_is_read_a_budget_at_a_time() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut io = LineIo::new(a).unwrap();
        let total = 100_000usize;
        let writer = std::thread::spawn(move || {
            let mut b = b;
            for i in 0..total {
                b.write_all(format!("{i}\n").as_bytes()).unwrap();
            }
        });
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while got.len() < total {
            assert!(std::time::Instant::now() < deadline, "only {} lines", got.len());
            let input = io.read_lines(1024);
            let bytes: usize = input.lines.iter().map(|l| l.len() + 1).sum();
            // The budget, plus the end of a line begun in the previous call.
            assert!(bytes <= READ_BUDGET + 8, "one call returned {bytes} bytes");
            got.extend(input.lines);
            if got.len() < total {
                std::thread::yield_now();
            }
        }
        writer.join().unwrap();
        assert!(got.iter().enumerate().all(|(i, l)| l == i.to_string().as_bytes()));
    }
}
