//! Reading message content: DATA's dot-stuffed stream up to its terminator, and BDAT's counted
//! chunks, with the same checks on both (strict line endings, NUL, line length, size).
//!
//! The one rule that stops SMTP smuggling (CVE-2023-51764 for Postfix, CVE-2023-51765 for
//! sendmail, CVE-2023-51766 for Exim): only `<CRLF>.<CRLF>` ends DATA. A dot line counts as the
//! end only when the line before it ended with CRLF and the dot line itself does; `<LF>.<CRLF>`,
//! `<CRLF>.<LF>`, `<CR>.<CR>` and the like stay content, and content with a bare LF or CR is
//! refused after the real terminator, and the connection closed (see [`Faults::refusal`]), so
//! nothing that follows is read as commands. A server that ended DATA at any of those shapes
//! would read a second message, hidden in the first by a sending server that passed the shape
//! through, as a transaction of its own.
//!
//! The reader is fed bytes as they come, so how TCP cut the stream cannot change what it finds.

use crate::mail::reply::Reply;
use crate::net::line::Framer;

/// What was wrong with received content. Reading goes on to the end of the data either way, so the
/// session stays in step with the client.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// A LF without CR or a CR without LF: the SMTP smuggling family.
    pub bare_newline: bool,
    /// A NUL byte: RFC 5322 text never holds one, and MTAs and mail stores written in C
    /// truncate lines at it. Without BINARYMIME (which we do not offer) it is refused.
    pub nul: bool,
    pub long_line: bool,
    pub too_big: bool,
}

/// How the session answers content with a fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    /// The session must close after the reply: the client's idea of where the message ended
    /// cannot be trusted, so nothing after it may be read as commands.
    pub close: bool,
}

impl Faults {
    /// The refusal for the first fault found, if any.
    pub fn refusal(&self, max_size: u64, max_line: usize) -> Option<Refusal> {
        let refuse = |reply| {
            Some(Refusal {
                reply,
                close: false,
            })
        };
        if self.bare_newline {
            Some(Refusal {
                reply: Reply::new(
                    550,
                    "5.5.2",
                    "Bare LF or CR in message content is not allowed; lines must end with CRLF",
                ),
                close: true,
            })
        } else if self.nul {
            refuse(Reply::new(
                550,
                "5.6.0",
                "NUL characters in message content are not allowed",
            ))
        } else if self.too_big {
            refuse(Reply::new(
                552,
                "5.3.4",
                format!("Message size exceeds fixed maximum message size of {max_size} bytes"),
            ))
        } else if self.long_line {
            refuse(Reply::new(
                550,
                "5.6.0",
                format!("Message content has a line longer than {max_line} characters"),
            ))
        } else {
            None
        }
    }
}

/// How the content arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// DATA: dot-stuffed, ended by `<CRLF>.<CRLF>`.
    Dotted,
    /// BDAT: raw bytes in counted chunks; the count, not the content, ends each chunk.
    Chunked,
}

/// Where the reader is within a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line that follows a CRLF (or the start of the content): in DATA, a dot
    /// here is either stuffing or the start of the terminator.
    LineStart,
    /// Inside a line, or at the start of one that follows a bare LF, where a dot is plain content.
    InLine,
    /// After a CR: a LF must follow.
    Cr,
    /// After a dot at the start of a line (DATA only).
    Dot,
    /// After a dot and a CR at the start of a line (DATA only): a LF ends the content.
    DotCr,
}

/// Collects message content: undoes dot-stuffing (DATA), keeps at most `max_size` bytes, and
/// records every fault. Content is kept as received otherwise (line endings included), so the
/// queue gets exactly the bytes the client sent.
pub struct ContentReader {
    framing: Framing,
    content: Vec<u8>,
    faults: Faults,
    max_size: u64,
    max_line: usize,
    /// Bytes of the current line so far, without its ending (a stuffing dot counts: the limit
    /// is on the line as sent).
    line_length: usize,
    state: State,
}

impl ContentReader {
    pub fn new(framing: Framing, max_size: u64, max_line: usize) -> ContentReader {
        ContentReader {
            framing,
            // Small until content arrives (a session held inside DATA holds only this), then
            // doubled as it grows.
            content: Vec::with_capacity(1024),
            faults: Faults::default(),
            max_size,
            max_line,
            line_length: 0,
            state: State::LineStart,
        }
    }

    /// The content and its faults. For BDAT, the end of the last chunk is also the end of the
    /// last line: a CR left waiting for its LF there is a bare CR (and content all the same).
    pub fn finish(mut self) -> (Vec<u8>, Faults) {
        if self.state == State::Cr {
            self.bare_cr();
        }
        self.end_line();
        (self.content, self.faults)
    }

    /// Feeds content bytes. For DATA, stops after the terminator and returns how many bytes that
    /// took and `true`; for BDAT every byte is content and the result is `(input.len(), false)`.
    pub fn read(&mut self, input: &[u8]) -> (usize, bool) {
        let mut position = 0;
        while position < input.len() {
            let byte = input[position];
            match self.state {
                State::LineStart => {
                    if byte == b'.' && self.framing == Framing::Dotted {
                        self.line_length = 1;
                        self.state = State::Dot;
                        position += 1;
                    } else {
                        self.state = State::InLine;
                    }
                }
                State::InLine => {
                    // Copy the run of ordinary bytes at once; stop at the next byte that matters.
                    let rest = &input[position..];
                    let run = memchr::memchr3(b'\r', b'\n', 0, rest).unwrap_or(rest.len());
                    self.push(&rest[..run]);
                    self.line_length += run;
                    position += run;
                    let Some(&special) = input.get(position) else {
                        break;
                    };
                    position += 1;
                    match special {
                        b'\r' => self.state = State::Cr,
                        b'\n' => {
                            // A bare LF ends a line for the length count, but the next line does
                            // not start after a CRLF: a dot there is not special.
                            self.faults.bare_newline = true;
                            self.push(b"\n");
                            self.end_line();
                        }
                        _ => {
                            self.faults.nul = true;
                            self.push(&[0]);
                            self.line_length += 1;
                        }
                    }
                }
                State::Cr => {
                    if byte == b'\n' {
                        position += 1;
                        self.push(b"\r\n");
                        self.end_line();
                        self.state = State::LineStart;
                    } else {
                        // The byte after a bare CR is read as line content.
                        self.bare_cr();
                    }
                }
                State::Dot => {
                    if byte == b'\r' {
                        position += 1;
                        self.state = State::DotCr;
                    } else {
                        // The dot was stuffing: dropped, and the line goes on.
                        self.state = State::InLine;
                    }
                }
                State::DotCr => {
                    if byte == b'\n' {
                        return (position + 1, true);
                    }
                    // `.<CR>` then something else: the dot was stuffing, the CR is bare.
                    self.bare_cr();
                }
            }
        }
        (input.len(), false)
    }

    fn bare_cr(&mut self) {
        self.faults.bare_newline = true;
        self.push(b"\r");
        self.line_length += 1;
        self.state = State::InLine;
    }

    fn end_line(&mut self) {
        if self.line_length > self.max_line {
            self.faults.long_line = true;
        }
        self.line_length = 0;
    }

    /// Keeps `bytes` unless the content would outgrow `max_size`; once it has, nothing more is
    /// kept (and what was kept is freed), but reading goes on.
    fn push(&mut self, bytes: &[u8]) {
        if self.faults.too_big {
            return;
        }
        if (self.content.len() + bytes.len()) as u64 > self.max_size {
            self.faults.too_big = true;
            self.content = Vec::new();
            return;
        }
        self.content.extend_from_slice(bytes);
    }
}

impl Framer for ContentReader {
    fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        self.read(input)
    }
}

/// One BDAT chunk: exactly `remaining` bytes, handed to a content reader, or dropped when the
/// transaction cannot take them (the chunk must still be read to stay in step).
pub struct Chunk<'a> {
    pub remaining: u64,
    pub into: Option<&'a mut ContentReader>,
}

impl Framer for Chunk<'_> {
    fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let take = input
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if let Some(reader) = self.into.as_deref_mut() {
            reader.read(&input[..take]);
        }
        self.remaining -= take as u64;
        (take, self.remaining == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::line::feed_cut;
    use proptest::prelude::*;

    /// Reads DATA content; `Some(consumed)` when the terminator was found.
    fn data(input: &[u8], cuts: &[usize]) -> (Option<usize>, Vec<u8>, Faults) {
        let mut reader = ContentReader::new(Framing::Dotted, 1 << 20, 998);
        let (consumed, done) = feed_cut(&mut reader, input, cuts);
        let (content, faults) = reader.finish();
        (done.then_some(consumed), content, faults)
    }

    fn bdat(chunks: &[&[u8]]) -> (Vec<u8>, Faults) {
        let mut reader = ContentReader::new(Framing::Chunked, 1 << 20, 998);
        for chunk in chunks {
            let mut framer = Chunk {
                remaining: chunk.len() as u64,
                into: Some(&mut reader),
            };
            if !chunk.is_empty() {
                assert_eq!(framer.feed(chunk), (chunk.len(), true));
            }
        }
        reader.finish()
    }

    #[test]
    fn terminator_and_unstuffing() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n";
        let (end, content, faults) = data(input, &[]);
        assert_eq!(end, Some(input.len() - 6));
        assert_eq!(content, b"Subject: x\r\n\r\n.leading dot\r\n");
        assert_eq!(faults, Faults::default());
        // Empty content: the CRLF of the DATA command precedes the dot.
        assert_eq!(data(b".\r\n", &[]).0, Some(3));
    }

    #[test]
    fn only_crlf_dot_crlf_ends_data() {
        // The issue's case: `body1<LF>.<CRLF>` and a whole second transaction after it.
        let smuggled: &[u8] = b"From: alice@acc.test\r\n\r\nbody1\n.\r\nMAIL FROM:<admin@acc.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: SMUGGLED\r\n\r\nsmuggled body\r\n.\r\nQUIT\r\n";
        let (end, content, faults) = data(smuggled, &[]);
        assert_eq!(end, Some(smuggled.len() - 6), "ends at the real terminator");
        assert!(faults.bare_newline);
        assert!(memchr::memmem::find(&content, b"MAIL FROM:<admin@acc.test>").is_some());
        for shape in [
            &b"a\r\n.\nb\r\n"[..],
            b"a\r.\r\nb\r\n",
            b"a\n.\nb\r\n",
            b"a\r\n.\rb\r\n",
            b"a\r\n.\r\r\nb\r\n",
        ] {
            let mut input = shape.to_vec();
            input.extend_from_slice(b".\r\n");
            let (end, _, faults) = data(&input, &[]);
            assert_eq!(end, Some(input.len()), "{shape:?}");
            assert!(faults.bare_newline, "{shape:?}");
        }
        // NUL before or after the dot: content, and refused for the NUL.
        let (end, content, faults) = data(b"a\0.\r\nb\r\n.\0\r\n.\r\n", &[]);
        assert_eq!(end, Some(15));
        assert_eq!(content, b"a\0.\r\nb\r\n\0\r\n");
        assert!(faults.nul && !faults.bare_newline);
    }

    #[test]
    fn refusals() {
        let faults = |bare_newline, nul| Faults {
            bare_newline,
            nul,
            ..Faults::default()
        };
        let bare = faults(true, true).refusal(10, 998).expect("refused");
        assert!(bare.close);
        assert_eq!(bare.reply.enhanced, "5.5.2");
        let nul = faults(false, true).refusal(10, 998).expect("refused");
        assert!(!nul.close);
        assert_eq!(
            nul.reply.to_wire(),
            "550 5.6.0 NUL characters in message content are not allowed\r\n"
        );
        assert_eq!(Faults::default().refusal(10, 998), None);
    }

    #[test]
    fn limits() {
        let mut reader = ContentReader::new(Framing::Dotted, 20, 4);
        let (_, done) = reader.read(b"12345\r\n1234\r\n.\r\n");
        assert!(done);
        let (content, faults) = reader.finish();
        assert_eq!(content, b"12345\r\n1234\r\n");
        assert!(faults.long_line && !faults.too_big);
        let mut reader = ContentReader::new(Framing::Dotted, 10, 998);
        reader.read(b"0123456789\r\n.\r\n");
        let (content, faults) = reader.finish();
        assert!(faults.too_big && content.is_empty());
    }

    #[test]
    fn bdat_chunks_are_checked_across_boundaries() {
        assert_eq!(bdat(&[b"a: b\r", b"\nbody\r\n"]).1, Faults::default());
        assert_eq!(bdat(&[b"a: b\r\n", b"", b"x"]).0, b"a: b\r\nx");
        assert!(bdat(&[b"a: b\r\n\nbody\r\n"]).1.bare_newline);
        assert!(bdat(&[b"a: b\r", b"body\r\n"]).1.bare_newline);
        assert!(bdat(&[b"body\r"]).1.bare_newline, "a CR at the very end");
        assert!(bdat(&[b"\nx"]).1.bare_newline);
        assert!(bdat(&[b"a\0b\r\n"]).1.nul);
        // Dots mean nothing in BDAT.
        assert_eq!(bdat(&[b"..x\r\n.\r\n"]).0, b"..x\r\n.\r\n");
        let long = format!("{}\r\n", "x".repeat(999));
        assert!(bdat(&[long.as_bytes()]).1.long_line);
        let fits = format!("{}\r\n", "x".repeat(998));
        assert!(!bdat(&[fits.as_bytes()]).1.long_line);
        assert!(bdat(&["x".repeat(999).as_bytes()]).1.long_line);
    }

    /// Bytes that matter to the reader, and an ordinary one.
    fn content_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), Just(0u8), Just(b'.'), Just(b'a')],
            0..96,
        )
    }

    proptest! {
        /// However the stream is cut, DATA ends at the same byte with the same content and
        /// faults.
        #[test]
        fn data_cuts_change_nothing(
            input in content_bytes(),
            cuts in proptest::collection::vec(0usize..96, 0..8),
        ) {
            prop_assert_eq!(data(&input, &[]), data(&input, &cuts));
        }

        /// DATA ends only right after `<CRLF>.<CRLF>` (or `.<CRLF>` at the very start), and
        /// content without a bare CR or LF never hides a terminator.
        #[test]
        fn data_ends_only_at_crlf_dot_crlf(input in content_bytes()) {
            let (end, _, faults) = data(&input, &[]);
            let first_terminator = (0..input.len()).find(|&at| {
                let dot_line = input[at..].starts_with(b".\r\n");
                let after_crlf = at == 0 || (at >= 2 && input[..at].ends_with(b"\r\n"));
                dot_line && after_crlf
            });
            if let Some(end) = end {
                prop_assert!(input[..end].ends_with(b".\r\n"));
                prop_assert!(end == 3 || input[..end - 3].ends_with(b"\r\n"));
            }
            if !faults.bare_newline {
                // With strict line endings, the reader and a plain search agree.
                prop_assert_eq!(end, first_terminator.map(|at| at + 3));
            }
        }

        /// BDAT content is kept byte for byte, however it is cut into chunks.
        #[test]
        fn bdat_keeps_every_byte(
            input in content_bytes(),
            cuts in proptest::collection::vec(0usize..96, 0..8),
        ) {
            let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
            bounds.push(0);
            bounds.push(input.len());
            bounds.sort_unstable();
            let chunks: Vec<&[u8]> = bounds.windows(2).map(|w| &input[w[0]..w[1]]).collect();
            let (content, faults) = bdat(&chunks);
            prop_assert_eq!(&content, &input);
            prop_assert_eq!(faults, bdat(&[&input]).1);
        }
    }
}
