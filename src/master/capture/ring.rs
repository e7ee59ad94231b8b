//! The recent captured lines the master keeps for `ecewo-cluster logs`: bounded by a number of
//! lines and of bytes, the oldest dropped first.

use std::collections::VecDeque;

use crate::proto::control::LogLine;

/// What a kept line is counted as besides its text (its fields, the deque's slot).
const OVERHEAD: usize = 64;

#[derive(Debug)]
pub(crate) struct Recent {
    lines: VecDeque<LogLine>,
    bytes: usize,
    max_lines: usize,
    max_bytes: usize,
}

impl Recent {
    pub(crate) fn new(max_lines: usize, max_bytes: usize) -> Recent {
        Recent { lines: VecDeque::new(), bytes: 0, max_lines, max_bytes }
    }

    pub(crate) fn push(&mut self, line: &LogLine) {
        let size = line.line.len() + OVERHEAD;
        if self.max_lines == 0 || size > self.max_bytes {
            return;
        }
        self.lines.push_back(line.clone());
        self.bytes += size;
        while self.lines.len() > self.max_lines || self.bytes > self.max_bytes {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.line.len() + OVERHEAD;
            }
        }
    }

    /// The newest `n` lines (of `worker` only, if given), oldest first, as many as fit in
    /// `budget` bytes of JSON (an answer must stay under the client's limit).
    pub(crate) fn last(&self, worker: Option<usize>, n: usize, budget: usize) -> Vec<LogLine> {
        let mut out = Vec::new();
        let mut used = 0;
        for l in self.lines.iter().rev().filter(|l| worker.is_none_or(|w| l.worker == w)).take(n) {
            // JSON escapes at most 6 bytes per byte of text (`\u0001`).
            used += serde_json::to_vec(l).map_or(l.line.len() * 6 + OVERHEAD, |v| v.len() + 1);
            if used > budget {
                break;
            }
            out.push(l.clone());
        }
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::control::LogStream;

    fn line(worker: usize, text: &str) -> LogLine {
        LogLine::new(std::time::UNIX_EPOCH, worker, 100 + worker as u32, LogStream::Stdout, text.into(), false)
    }

    #[test]
    fn keeps_the_newest_within_lines_and_bytes() {
        let mut r = Recent::new(3, 10_000);
        for i in 0..5 {
            r.push(&line(i % 2, &format!("l{i}")));
        }
        let texts = |v: Vec<LogLine>| v.into_iter().map(|l| l.line).collect::<Vec<_>>();
        assert_eq!(texts(r.last(None, 10, usize::MAX)), ["l2", "l3", "l4"]);
        assert_eq!(texts(r.last(None, 2, usize::MAX)), ["l3", "l4"]);
        assert_eq!(texts(r.last(Some(1), 10, usize::MAX)), ["l3"]);
        assert_eq!(texts(r.last(Some(7), 10, usize::MAX)), Vec::<String>::new());
        // Bytes: each line counts its text plus the overhead.
        let mut r = Recent::new(100, 2 * (OVERHEAD + 10));
        for i in 0..5 {
            r.push(&line(0, &format!("{i:010}")));
        }
        assert_eq!(texts(r.last(None, 100, usize::MAX)), ["0000000003", "0000000004"]);
        // A budget smaller than the lines: the newest that fit.
        let one = serde_json::to_vec(&line(0, "0000000004")).unwrap().len() + 1;
        assert_eq!(texts(r.last(None, 100, one)), ["0000000004"]);
        // Nothing kept with a zero limit.
        let mut r = Recent::new(0, 1000);
        r.push(&line(0, "x"));
        assert!(r.last(None, 10, usize::MAX).is_empty());
    }
}
