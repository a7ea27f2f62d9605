//! A buffered connection that reads bounded lines and buffers replies until the peer has nothing
//! more pipelined (RFC 2920: replies to a pipelined group go out together).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::stream::Stream;

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
#[derive(Debug)]
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
}

pub struct Conn {
    reader: BufReader<Stream>,
    out: Vec<u8>,
    /// How long sending one buffer of replies (or a body) may take in all: a peer that stops
    /// reading (its window full of our replies) is dropped instead of pinning the session forever.
    write_timeout: Duration,
}

/// The write timeout until a caller sets its own (RFC 5321 4.5.3.2's five minutes).
const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(300);

impl Conn {
    pub fn new(stream: Stream) -> Conn {
        Conn {
            reader: BufReader::with_capacity(64 * 1024, stream),
            out: Vec::with_capacity(1024),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }

    pub fn with_write_timeout(mut self, timeout: Duration) -> Conn {
        self.write_timeout = timeout;
        self
    }

    /// Writes all of `bytes` within the write timeout.
    async fn write_timed(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.reader.get_mut();
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not read what was sent within the write timeout",
            )),
        }
    }

    pub fn stream(&self) -> &Stream {
        self.reader.get_ref()
    }

    /// True when the peer has sent bytes we have not read yet.
    pub fn has_buffered_input(&self) -> bool {
        !self.reader.buffer().is_empty()
    }

    /// The stream, for a TLS upgrade. Buffered input is dropped: a caller must have refused it.
    pub fn into_stream(self) -> Stream {
        self.reader.into_inner()
    }

    /// Reads one line of at most `max` bytes (excluding the line ending); the rest of a longer line
    /// is read and discarded so the protocol stays in step.
    pub async fn read_line(&mut self, max: usize) -> io::Result<Line> {
        let mut line = Line {
            bytes: Vec::new(),
            end: LineEnd::Eof,
            too_long: false,
        };
        // Whether the byte before the LF was a CR, kept even when the line is too long to store.
        let mut last_was_cr = false;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Ok(line);
            }
            let (chunk, found_lf) = match memchr::memchr(b'\n', available) {
                Some(position) => (&available[..position], true),
                None => (available, false),
            };
            if let Some(&last) = chunk.last() {
                last_was_cr = last == b'\r';
            }
            // One more byte than `max` may be a CR of the ending.
            let room = (max + 1).saturating_sub(line.bytes.len());
            if chunk.len() > room {
                line.bytes.extend_from_slice(&chunk[..room]);
                line.too_long = true;
            } else {
                line.bytes.extend_from_slice(chunk);
            }
            let consumed = chunk.len() + usize::from(found_lf);
            self.reader.consume(consumed);
            if found_lf {
                if last_was_cr {
                    if !line.too_long || line.bytes.last() == Some(&b'\r') {
                        line.bytes.pop();
                    }
                    line.end = LineEnd::Crlf;
                } else {
                    line.end = LineEnd::BareLf;
                }
                if line.bytes.len() > max {
                    line.bytes.truncate(max);
                    line.too_long = true;
                }
                return Ok(line);
            }
        }
    }

    /// Reads exactly `count` bytes, appending at most `keep` of them to `into` and discarding the
    /// rest (a BDAT chunk beyond the size limit still has to be read).
    pub async fn read_chunk(
        &mut self,
        count: u64,
        into: &mut Vec<u8>,
        keep: u64,
    ) -> io::Result<()> {
        let mut remaining = count;
        let mut keep = keep;
        while remaining > 0 {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a BDAT chunk",
                ));
            }
            let take = available
                .len()
                .min(remaining.min(usize::MAX as u64) as usize);
            let kept = take.min(keep.min(usize::MAX as u64) as usize);
            into.extend_from_slice(&available[..kept]);
            keep -= kept as u64;
            self.reader.consume(take);
            remaining -= take as u64;
        }
        Ok(())
    }

    /// Reads whatever is available into a small buffer (used to detect data where none is
    /// expected).
    pub async fn read_some(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buffer).await
    }

    /// Adds bytes to the output buffer.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Sends the output buffer.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            self.write_timed(&out).await?;
            // Keep the buffer's allocation for the next replies.
            self.out = out;
            self.out.clear();
        }
        Ok(())
    }

    /// Sends the output buffer unless the peer has more pipelined input waiting.
    pub async fn flush_if_idle(&mut self) -> io::Result<()> {
        if self.has_buffered_input() {
            Ok(())
        } else {
            self.flush().await
        }
    }

    /// Writes bytes straight to the peer (a message body), after anything buffered.
    pub async fn write_now(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.flush().await?;
        self.write_timed(bytes).await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let timeout = self.write_timeout;
        let _ = tokio::time::timeout(timeout, self.reader.get_mut().shutdown()).await;
    }
}
