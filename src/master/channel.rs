//! The master's end of one worker channel: typed messages over [`LineIo`], with backpressure.
//!
//! A worker's queries are answered through a per-channel output buffer, so a slow worker never
//! blocks the master's loop. What a worker may make the master hold is bounded: input lines by
//! [`MAX_LINE`]; output by [`MAX_PENDING_OUTPUT`]: while that much is waiting for the worker to
//! read it, the master reads nothing more from that worker (its requests wait in the socket, and
//! its writes block), and it hands the loop only as many requests as fit.

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixStream;

use crate::proto::channel::{MAX_LINE, ToMaster, ToWorker, encode};
use crate::proto::line::LineIo;

/// The most output the master keeps for one worker (answers it has not read yet) before it
/// stops reading that worker's requests: 16 MiB, room for many stats answers even of the
/// largest cluster (about 1 MiB each). It can be passed by at most one answer.
pub(crate) const MAX_PENDING_OUTPUT: usize = 2 * MAX_LINE;

/// The most batches of messages the loop takes from one channel per wake-up: a worker that
/// writes as fast as the master reads cannot hold the loop.
pub(crate) const MAX_BATCHES: usize = 8;

/// The master's end of one worker channel.
#[derive(Debug)]
pub(crate) struct MasterEnd {
    pub(crate) io: LineIo,
    /// The worker closed its end (or broke the protocol): stop polling for input.
    pub(crate) closed: bool,
    /// Messages read but not handed to the loop yet (requests beyond what the output buffer has
    /// room to answer). Nothing more is read from the socket until they are handed over.
    queued: VecDeque<ToMaster>,
    /// The largest answer sent so far: how much output one more request may add.
    answer_size: usize,
    /// [`MAX_PENDING_OUTPUT`], smaller in tests.
    max_pending: usize,
}

impl MasterEnd {
    pub(crate) fn new(sock: UnixStream) -> io::Result<MasterEnd> {
        MasterEnd::with_limit(sock, MAX_PENDING_OUTPUT)
    }

    fn with_limit(sock: UnixStream, max_pending: usize) -> io::Result<MasterEnd> {
        Ok(MasterEnd { io: LineIo::new(sock)?, closed: false, queued: VecDeque::new(), answer_size: 0, max_pending })
    }

    /// Room left in the output buffer before the cap.
    fn room(&self) -> usize {
        self.max_pending.saturating_sub(self.io.pending_output())
    }

    /// The loop should poll this channel for input: it is open, every request read so far was
    /// handed over, and the output buffer is under its cap. (While it is not, requests wait in
    /// the socket: the worker is not reading its answers.)
    pub(crate) fn wants_read(&self) -> bool {
        !self.closed && self.queued.is_empty() && self.room() > 0
    }

    /// The loop should poll this channel for output: answers are waiting for the socket to
    /// take them, or requests are waiting for room to answer them (writability is the sign to
    /// go on; the socket is writable at once unless the worker stopped reading).
    pub(crate) fn wants_write(&self) -> bool {
        !self.closed && (self.io.wants_write() || !self.queued.is_empty())
    }

    /// Reads what is available (only while [`wants_read`](MasterEnd::wants_read)) and returns
    /// the complete messages, requests only as many as the output buffer has room to answer;
    /// the others wait for the next call. Malformed lines are skipped (and logged); EOF, an
    /// error or an oversized line mark the channel closed.
    pub(crate) fn read_messages(&mut self) -> Vec<ToMaster> {
        if self.wants_read() {
            let input = self.io.read_lines(MAX_LINE);
            if input.too_long {
                tracing::warn!("a worker channel sent a line over {MAX_LINE} bytes; ignoring the channel");
            }
            self.closed |= input.eof || input.too_long;
            let (mut malformed, mut first_error) = (0usize, None);
            self.queued.extend(input.lines.iter().filter_map(|line| match serde_json::from_slice::<ToMaster>(line) {
                Ok(msg) => Some(msg),
                Err(e) => {
                    malformed += 1;
                    first_error.get_or_insert(e);
                    None
                }
            }));
            // One line per read, however many: a worker flooding garbage cannot flood the log.
            if let Some(e) = first_error {
                tracing::warn!("ignoring {malformed} malformed message(s) from a worker: {e}");
            }
        }
        if self.closed {
            // Nobody will read answers any more: only what needs none is worth handing over.
            return self.queued.drain(..).filter(|m| !matches!(m, ToMaster::Stats { .. })).collect();
        }
        let room = self.room();
        let mut answers = match (room, self.answer_size) {
            (0, _) => 0,
            // The size of an answer is not known yet: one, to learn it.
            (_, 0) => 1,
            (room, size) => (room / size).max(1),
        };
        let mut out = Vec::new();
        while let Some(msg) = self.queued.front() {
            if matches!(msg, ToMaster::Stats { .. }) {
                if answers == 0 {
                    break;
                }
                answers -= 1;
            }
            out.extend(self.queued.pop_front());
        }
        out
    }

    /// Requests were read that wait for room in the output buffer to be answered, and there is
    /// room now (the socket took the last answers at once): call
    /// [`read_messages`](MasterEnd::read_messages) again rather than wait for the socket to be
    /// writable, which it may not become while the worker does not read.
    pub(crate) fn can_answer_more(&self) -> bool {
        !self.closed && !self.queued.is_empty() && self.room() > 0
    }

    /// Queues a message and writes as much as the socket takes now.
    pub(crate) fn send(&mut self, msg: &ToWorker) {
        if self.closed {
            return;
        }
        let line = encode(msg);
        self.answer_size = self.answer_size.max(line.len());
        if self.io.send(&line).is_err() {
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
    use std::io::{Read, Write};

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

    /// A stats answer of about 2 KiB.
    fn answer(id: u64) -> ToWorker {
        static WORKERS: std::sync::OnceLock<Vec<crate::stats::WorkerStats>> = std::sync::OnceLock::new();
        let workers = WORKERS.get_or_init(|| {
            let one = r#"{"worker_id":0,"pid":1,"port":1,"status":"active","start_time":null,"uptime":0.0,"exit_status":null,"crash_count":0,"respawn_disabled":false}"#;
            serde_json::from_str(&format!("[{}]", [one; 12].join(","))).unwrap()
        });
        ToWorker::Stats { id, cluster: Default::default(), workers: workers.clone() }
    }

    /// One turn of the master's loop for this channel: poll it with the flags the driver uses,
    /// then flush, read and answer, as `Driver::on_channel` does. False if nothing happened.
    fn master_turn(end: &mut MasterEnd, answered: &mut u64) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let mut flags = PollFlags::empty();
        if end.wants_read() {
            flags |= PollFlags::IN;
        }
        if end.wants_write() {
            flags |= PollFlags::OUT;
        }
        let mut fds = [PollFd::new(&end.io.sock, flags)];
        let ready = rustix::event::poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 20_000_000 })).unwrap();
        if ready == 0 {
            return false;
        }
        end.flush();
        for _ in 0..MAX_BATCHES {
            for msg in end.read_messages() {
                if let ToMaster::Stats { id } = msg {
                    end.send(&answer(id));
                    *answered += 1;
                }
            }
            if !end.can_answer_more() {
                break;
            }
        }
        true
    }

    #[test]
    fn a_worker_that_never_reads_cannot_grow_the_masters_output_past_the_cap() {
        let cap = 256 << 10;
        let size = encode(&answer(u64::MAX)).len();
        assert!(size > 2000, "{size}");
        let (a, mut worker) = UnixStream::pair().unwrap();
        worker.set_nonblocking(true).unwrap();
        let mut end = MasterEnd::with_limit(a, cap).unwrap();
        // The worker pipelines requests as fast as the socket takes them (many per write: small
        // writes would fill the socket's budget with overhead) and reads nothing.
        let (mut asked, mut answered, mut max_pending) = (0u64, 0u64, 0usize);
        let mut unsent = Vec::new();
        let mut idle_turns = 0;
        while idle_turns < 5 {
            let mut wrote = false;
            loop {
                if unsent.is_empty() {
                    for _ in 0..64 {
                        unsent.extend(encode(&ToMaster::Stats { id: asked }));
                        asked += 1;
                    }
                }
                match worker.write(&unsent) {
                    Ok(n) => {
                        unsent.drain(..n);
                        wrote = true;
                    }
                    Err(_) => break,
                }
            }
            let moved = master_turn(&mut end, &mut answered);
            max_pending = max_pending.max(end.io.pending_output());
            assert!(end.io.pending_output() <= cap + size, "{} pending", end.io.pending_output());
            idle_turns = if moved || wrote { 0 } else { idle_turns + 1 };
            assert!(asked < 10_000_000);
        }
        // Whatever the worker could not write yet, it writes once the master reads again.
        let (mut rest, rest_asked) = (unsent, asked);
        // Answering everything asked would have needed far more than the cap.
        assert!(asked as usize * size > 8 * cap, "asked {asked}");
        assert!(end.io.pending_output() > 0);
        assert!(max_pending > cap / 2, "the buffer was used: {max_pending}");
        assert!(answered < asked, "the master stopped answering: {answered} of {asked}");
        assert!(!end.wants_read(), "and stopped reading");
        assert!(!end.closed);
        // Once the worker reads, every request is answered, in order.
        let mut received = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut answers_in = 0;
        while answered < rest_asked || end.io.wants_write() || answers_in < rest_asked {
            if !rest.is_empty()
                && let Ok(n) = worker.write(&rest)
            {
                rest.drain(..n);
            }
            while let Ok(n) = worker.read(&mut buf) {
                assert!(n > 0, "the master hung up");
                answers_in += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                received.extend_from_slice(&buf[..n]);
            }
            master_turn(&mut end, &mut answered);
            assert!(end.io.pending_output() <= cap + size);
            assert!(std::time::Instant::now() < deadline, "stalled at {answered} of {rest_asked}");
        }
        let lines: Vec<&[u8]> = received.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len() as u64, rest_asked);
        for (i, line) in lines.into_iter().enumerate() {
            assert_eq!(serde_json::from_slice::<ToWorker>(line).unwrap(), answer(i as u64), "answers in order");
        }
    }

    #[test]
    fn a_worker_that_hung_up_gets_no_more_answers() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut end = MasterEnd::with_limit(a, 1).unwrap();
        for id in 0..100 {
            b.write_all(&encode(&ToMaster::Stats { id })).unwrap();
        }
        b.write_all(&encode(&ToMaster::Ready)).unwrap();
        assert_eq!(
            end.read_messages(),
            vec![ToMaster::Stats { id: 0 }],
            "one request while the answer size is unknown"
        );
        end.send(&answer(0));
        assert!(!end.wants_read(), "requests are waiting");
        assert!(end.wants_write());
        drop(b);
        // As the loop does: answer what it is given; the first answer after the hang-up fails.
        let mut answered = 0;
        let mut rest = Vec::new();
        for _ in 0..10 {
            end.flush();
            for msg in end.read_messages() {
                if let ToMaster::Stats { id } = msg {
                    end.send(&answer(id));
                    answered += 1;
                } else {
                    rest.push(msg);
                }
            }
        }
        assert!(end.closed);
        assert!(answered <= 1, "{answered} answers to a worker that hung up");
        assert_eq!(rest, vec![ToMaster::Ready], "what needs no answer still counts");
    }
}
