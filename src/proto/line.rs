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
