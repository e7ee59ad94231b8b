//! Splitting a worker's output into lines: bytes come in as the pipe gives them, whole lines
//! go out; a line longer than the maximum is cut into pieces of the maximum (at a UTF-8
//! character boundary where there is one), each but the last marked `continued`.

/// A piece of output: a whole line (without its newline), or a piece of a longer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) bytes: Vec<u8>,
    /// More of the same line follows.
    pub(crate) continued: bool,
}

/// The line being assembled from one output stream of one worker.
#[derive(Debug)]
pub(crate) struct Splitter {
    buf: Vec<u8>,
    max: usize,
}

impl Splitter {
    /// Lines of at most `max` bytes (at least 4, so that a character always fits).
    pub(crate) fn new(max: usize) -> Splitter {
        Splitter { buf: Vec::new(), max: max.max(4) }
    }

    /// Takes `data` and appends the lines it completes (and the pieces of over-long lines) to
    /// `out`.
    pub(crate) fn feed(&mut self, mut data: &[u8], out: &mut Vec<Piece>) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.buf.extend_from_slice(&data[..i]);
                    self.cut_long(out);
                    out.push(Piece { bytes: std::mem::take(&mut self.buf), continued: false });
                    data = &data[i + 1..];
                }
                None => {
                    self.buf.extend_from_slice(data);
                    self.cut_long(out);
                    data = &[];
                }
            }
        }
    }

    /// The output ended (the worker exited, the pipe closed): the partial last line, if any.
    pub(crate) fn finish(&mut self, out: &mut Vec<Piece>) {
        if !self.buf.is_empty() {
            out.push(Piece { bytes: std::mem::take(&mut self.buf), continued: false });
        }
    }

    /// Cuts pieces of `max` bytes off the front while more than `max` bytes wait (one move of
    /// what is left, however many pieces).
    fn cut_long(&mut self, out: &mut Vec<Piece>) {
        let mut start = 0;
        while self.buf.len() - start > self.max {
            let mut cut = start + self.max;
            // Back off to the start of a UTF-8 character (at most 3 bytes), if there is one.
            let floor = cut - 3;
            while cut > floor && is_continuation(self.buf[cut]) {
                cut -= 1;
            }
            if is_continuation(self.buf[cut]) {
                cut = start + self.max;
            }
            out.push(Piece { bytes: self.buf[start..cut].to_vec(), continued: true });
            start = cut;
        }
        if start > 0 {
            self.buf.drain(..start);
        }
    }
}

fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(max: usize, chunks: &[&[u8]], finish: bool) -> Vec<(String, bool)> {
        let mut s = Splitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        if finish {
            s.finish(&mut out);
        }
        out.into_iter().map(|p| (String::from_utf8(p.bytes).unwrap(), p.continued)).collect()
    }

    #[test]
    fn lines_are_assembled_across_reads() {
        assert_eq!(
            pieces(100, &[b"a", b"bc\nde", b"f\n\ng"], false),
            vec![("abc".into(), false), ("def".into(), false), (String::new(), false)]
        );
        // The partial last line comes out at the end, whole.
        assert_eq!(pieces(100, &[b"x\nlast"], true), vec![("x".into(), false), ("last".into(), false)]);
        assert_eq!(pieces(100, &[b"x\n"], true), vec![("x".into(), false)]);
    }

    #[test]
    fn long_lines_are_cut_and_marked() {
        assert_eq!(
            pieces(4, &[b"abcdefghij\n"], false),
            vec![("abcd".into(), true), ("efgh".into(), true), ("ij".into(), false)]
        );
        // Exactly the maximum is one piece; the cut happens also before the newline arrives.
        assert_eq!(pieces(4, &[b"abcd\n"], false), vec![("abcd".into(), false)]);
        assert_eq!(pieces(4, &[b"abcde"], false), vec![("abcd".into(), true)]);
        // A multi-byte character is never split (é is 2 bytes, € 3).
        let got = pieces(4, &["abcé€\n".as_bytes()], false);
        assert_eq!(got, vec![("abc".into(), true), ("é".into(), true), ("€".into(), false)]);
        assert!(got.iter().all(|(p, _)| p.len() <= 4));
        assert_eq!(got.iter().map(|(p, _)| p.as_str()).collect::<String>(), "abcé€");
    }

    /// Random chunking of random lines: the pieces put together are the input, every piece is
    /// at most the maximum, and only the last piece of each line is unmarked.
    #[test]
    fn any_chunking_gives_the_same_lines() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..200 {
            let max = 4 + (next() % 40) as usize;
            let lines: Vec<String> = (0..(next() % 20))
                .map(|i| (0..(next() % 120)).map(|j| ["a", "é", "€", "𝄞"][((i + j + round) % 4) as usize]).collect())
                .collect();
            let input: Vec<u8> = lines.iter().flat_map(|l| l.bytes().chain([b'\n'])).collect();
            let mut s = Splitter::new(max);
            let mut out = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + (next() as usize) % rest.len().min(50);
                s.feed(&rest[..n], &mut out);
                rest = &rest[n..];
            }
            let mut rebuilt = Vec::new();
            let mut line = Vec::new();
            for p in &out {
                assert!(p.bytes.len() <= max, "piece of {} > {max}", p.bytes.len());
                assert!(std::str::from_utf8(&p.bytes).is_ok(), "a piece cut a character");
                line.extend_from_slice(&p.bytes);
                if !p.continued {
                    rebuilt.push(String::from_utf8(std::mem::take(&mut line)).unwrap());
                }
            }
            assert_eq!(rebuilt, lines);
        }
    }
}
