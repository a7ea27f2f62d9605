//! Splitting a byte stream into bounded lines, whatever way the stream is cut.
//!
//! The reader holds no socket: it is fed the bytes at hand and says how many it took and whether
//! a line is complete. The outcome therefore cannot depend on how TCP (or TLS records) split the
//! peer's bytes, which the property tests check by feeding the same bytes cut at random points.

/// How a line ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineEnd {
    Crlf,
    /// A LF without the CR before it.
    BareLf,
    /// The peer closed the connection in the middle of (or before) the line.
    Eof,
}

/// One line as read, without its line ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub bytes: Vec<u8>,
    pub end: LineEnd,
    /// The line was longer than the limit; `bytes` holds only the start of it.
    pub too_long: bool,
}

impl Line {
    /// A CR inside the line that is not part of its CRLF ending.
    pub fn has_bare_cr(&self) -> bool {
        memchr::memchr(b'\r', &self.bytes).is_some()
    }

    /// Whether the line holds a control character other than HTAB: NUL, a bare CR, ESC, DEL, or
    /// a C1 control in UTF-8 (U+0080 to U+009F) have no place in an SMTP command, and copied into
    /// a header (a HELO name goes into `Received:`) or a log line they would corrupt it.
    pub fn has_control_character(&self) -> bool {
        let control = |c: char| c.is_control() && c != '\t';
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => text.chars().any(control),
            // Not UTF-8 (refused anyway): judge the ASCII bytes.
            Err(_) => self
                .bytes
                .iter()
                .any(|&byte| byte < 0x80 && control(char::from(byte))),
        }
    }
}

/// Something fed a stream's bytes a piece at a time until it has what it wants.
pub trait Framer {
    /// Takes what it needs from the start of `input` (which is never empty). Returns how many
    /// bytes it consumed and whether its frame is now complete; bytes after a complete frame are
    /// left for the next reader.
    fn feed(&mut self, input: &[u8]) -> (usize, bool);
}

/// Reads one line of at most `max` bytes (excluding the line ending); the rest of a longer line
/// is consumed and discarded, so the protocol stays in step.
pub struct LineReader {
    line: Line,
    max: usize,
    /// Whether the last byte seen was a CR, kept even when the line is too long to store.
    last_was_cr: bool,
}

impl LineReader {
    pub fn new(max: usize) -> LineReader {
        LineReader {
            line: Line {
                bytes: Vec::new(),
                end: LineEnd::Eof,
                too_long: false,
            },
            max,
            last_was_cr: false,
        }
    }

    /// The line read: complete, or (when the stream ended first) what came before the end.
    pub fn into_line(self) -> Line {
        self.line
    }
}

impl Framer for LineReader {
    fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let (chunk, found_lf) = match memchr::memchr(b'\n', input) {
            Some(position) => (&input[..position], true),
            None => (input, false),
        };
        if let Some(&last) = chunk.last() {
            self.last_was_cr = last == b'\r';
        }
        let line = &mut self.line;
        // One more byte than `max` may be the CR of the ending.
        let room = (self.max + 1).saturating_sub(line.bytes.len());
        if chunk.len() > room {
            line.bytes.extend_from_slice(&chunk[..room]);
            line.too_long = true;
        } else {
            line.bytes.extend_from_slice(chunk);
        }
        let consumed = chunk.len() + usize::from(found_lf);
        if !found_lf {
            return (consumed, false);
        }
        if self.last_was_cr {
            if !line.too_long || line.bytes.last() == Some(&b'\r') {
                line.bytes.pop();
            }
            line.end = LineEnd::Crlf;
        } else {
            line.end = LineEnd::BareLf;
        }
        if line.bytes.len() > self.max {
            line.bytes.truncate(self.max);
            line.too_long = true;
        }
        (consumed, true)
    }
}

/// Feeds `input` to `framer` in pieces that end at each of `cuts` (positions into `input`);
/// returns how many bytes the framer consumed in all and whether it completed. The property
/// tests of every framer use it to show that the cuts change nothing.
#[cfg(test)]
pub fn feed_cut(framer: &mut impl Framer, input: &[u8], cuts: &[usize]) -> (usize, bool) {
    let mut bounds: Vec<usize> = cuts.iter().map(|&cut| cut.min(input.len())).collect();
    bounds.push(input.len());
    bounds.sort_unstable();
    let mut position = 0;
    for bound in bounds {
        // A framer may stop short of a piece's end only when complete; feed it the rest of the
        // piece again as TCP would leave it in the buffer.
        while position < bound {
            let (consumed, done) = framer.feed(&input[position..bound]);
            position += consumed;
            if done {
                return (position, true);
            }
            assert!(consumed > 0, "a framer must make progress");
        }
    }
    (position, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(input: &[u8], max: usize, cuts: &[usize]) -> (Line, usize) {
        let mut reader = LineReader::new(max);
        let (consumed, _) = feed_cut(&mut reader, input, cuts);
        (reader.into_line(), consumed)
    }

    #[test]
    fn endings() {
        let (line, consumed) = read(b"MAIL FROM:<a@b>\r\nRCPT", 100, &[]);
        assert_eq!(line.bytes, b"MAIL FROM:<a@b>");
        assert_eq!(line.end, LineEnd::Crlf);
        assert_eq!(consumed, 17);
        assert_eq!(read(b"NOOP\nX", 100, &[]).0.end, LineEnd::BareLf);
        assert_eq!(read(b"NOOP", 100, &[]).0.end, LineEnd::Eof);
        // The CR of the ending arrives in one piece, the LF in the next.
        let (line, _) = read(b"NOOP\r\n", 100, &[5]);
        assert_eq!(
            (line.bytes.as_slice(), line.end),
            (&b"NOOP"[..], LineEnd::Crlf)
        );
    }

    #[test]
    fn long_lines_are_cut_but_consumed() {
        let (line, consumed) = read(b"0123456789\r\nNEXT", 4, &[]);
        assert_eq!(line.bytes, b"0123");
        assert!(line.too_long);
        assert_eq!(line.end, LineEnd::Crlf);
        assert_eq!(consumed, 12);
        // Exactly at the limit is not too long, even with the CR in the next piece.
        let (line, _) = read(b"0123\r\n", 4, &[4]);
        assert_eq!(
            (line.bytes.as_slice(), line.too_long),
            (&b"0123"[..], false)
        );
    }

    #[test]
    fn control_characters() {
        let line = |bytes: &[u8]| Line {
            bytes: bytes.to_vec(),
            end: LineEnd::Crlf,
            too_long: false,
        };
        assert!(line(b"EHLO a\0b").has_control_character());
        assert!(line(b"HELO \x1b[31m").has_control_character());
        assert!(line(b"NOOP \x7f").has_control_character());
        assert!(line("EHLO a\u{9b}31m.test".as_bytes()).has_control_character());
        assert!(line(b"EHLO \xff\x00").has_control_character());
        assert!(!line(b"EHLO a\tb").has_control_character());
        assert!(!line("EHLO bücher.example".as_bytes()).has_control_character());
    }

    proptest! {
        /// However the stream is cut, the reader finds the same line and consumes the same bytes.
        #[test]
        fn cuts_change_nothing(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(0u8), Just(b'.'), Just(b'a')],
                0..64,
            ),
            cuts in proptest::collection::vec(0usize..64, 0..8),
            max in 0usize..16,
        ) {
            prop_assert_eq!(read(&input, max, &[]), read(&input, max, &cuts));
        }
    }
}
