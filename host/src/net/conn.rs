//! A buffered connection that reads bounded lines and buffers replies until the peer has nothing
//! more pipelined (RFC 2920: replies to a pipelined group go out together).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::input::Input;
use super::line::{Framer, Line, LineReader};
use super::stream::Stream;

pub struct Conn {
    stream: Stream,
    input: Input,
    out: Vec<u8>,
    /// How long sending one buffer of replies (or a body) may take in all: a peer that stops
    /// reading (its window full of our replies) is dropped instead of pinning the session forever.
    write_timeout: Duration,
}

/// How long [`Conn::close_lingering`] waits for more input, in all, and how much it reads.
const LINGER_IDLE: Duration = Duration::from_millis(200);
const LINGER_TOTAL: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// The write timeout until a caller sets its own (RFC 5321 4.5.3.2's five minutes).
const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(300);

impl Conn {
    pub fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            input: Input::default(),
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
        let stream = &mut self.stream;
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
        &self.stream
    }

    /// True when the peer has sent bytes we have not read yet.
    pub fn has_buffered_input(&self) -> bool {
        !self.input.buffered().is_empty()
    }

    /// The stream, for a TLS upgrade. Buffered input is dropped: a caller must have refused it.
    pub fn into_stream(self) -> Stream {
        self.stream
    }

    /// Feeds the peer's bytes to `framer` until its frame is complete (`true`) or the peer
    /// closes the connection first (`false`). Bytes after the frame stay buffered.
    pub async fn read_frame(&mut self, framer: &mut impl Framer) -> io::Result<bool> {
        loop {
            let available = self.input.fill(&mut self.stream).await?;
            if available.is_empty() {
                return Ok(false);
            }
            let (consumed, complete) = framer.feed(available);
            self.input.consume(consumed);
            if complete {
                return Ok(true);
            }
        }
    }

    /// Reads one line of at most `max` bytes (excluding the line ending); the rest of a longer line
    /// is read and discarded so the protocol stays in step.
    pub async fn read_line(&mut self, max: usize) -> io::Result<Line> {
        let mut reader = LineReader::new(max);
        self.read_frame(&mut reader).await?;
        Ok(reader.into_line())
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
        let _ = tokio::time::timeout(timeout, self.stream.shutdown()).await;
    }

    /// [`Conn::shutdown`], then reads and discards what the peer still sends, briefly: a socket
    /// closed with input unread makes the kernel send a reset, and the peer's stack may then drop
    /// our last replies (a 550 and 421, say) before its application reads them (RFC 7230 6.6
    /// describes the same for HTTP). Ends at the peer's end of stream, after `LINGER_IDLE`
    /// without input, after `LINGER_TOTAL`, or after `LINGER_BYTES`.
    pub async fn close_lingering(&mut self) {
        self.shutdown().await;
        let deadline = tokio::time::Instant::now() + LINGER_TOTAL;
        let mut scratch = [0u8; 4096];
        let mut discarded = self.input.buffered().len();
        self.input.discard();
        while discarded < LINGER_BYTES {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(LINGER_IDLE.min(left), self.stream.read(&mut scratch)).await
            {
                Ok(Ok(read)) if read > 0 => discarded += read,
                _ => return,
            }
        }
    }
}
