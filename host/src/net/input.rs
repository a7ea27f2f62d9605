//! A connection's input buffer that fits what arrives: a kilobyte while the peer sends
//! commands, doubled read by read while it streams a message (up to 64 KiB, so a large message
//! still costs few reads), and a kilobyte again once the stream slows. An idle session holds a
//! kilobyte of buffer instead of 64 (issue 32: memory per session).
//!
//! Reads go into the buffer's spare capacity, which is never zeroed first: memory the peer has
//! not filled is not touched, so it is not made resident either.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What a read asks for while the peer sends commands: a command line is at most 512 bytes
/// (RFC 5321 4.5.3.1.4), a pipelined group a few of them.
const SMALL: usize = 1024;
/// The most one read asks for.
const LARGE: usize = 64 * 1024;

pub struct Input {
    buffer: BytesMut,
    /// How much the next read asks for.
    window: usize,
}

impl Default for Input {
    fn default() -> Input {
        Input {
            buffer: BytesMut::with_capacity(SMALL),
            window: SMALL,
        }
    }
}

impl Input {
    /// The bytes read and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buffer
    }

    /// The buffered bytes; when there are none, first one read from `stream`. Empty at the end
    /// of the stream.
    pub async fn fill(&mut self, stream: &mut (impl AsyncRead + Unpin)) -> io::Result<&[u8]> {
        if self.buffer.is_empty() {
            // An empty buffer's space is reused from its start: no allocation per read.
            self.buffer.reserve(self.window);
            let read = stream
                .read_buf(&mut (&mut self.buffer).limit(self.window))
                .await?;
            self.fit(read);
        }
        Ok(&self.buffer)
    }

    /// Marks `count` buffered bytes as used.
    pub fn consume(&mut self, count: usize) {
        self.buffer.advance(count.min(self.buffer.len()));
    }

    /// Drops what is buffered (input a caller has refused or will not read).
    pub fn discard(&mut self) {
        self.buffer.clear();
    }

    /// Sizes the next read after one that got `read` bytes.
    fn fit(&mut self, read: usize) {
        if read == self.window && self.window < LARGE {
            // The read got all it asked for: more is likely waiting.
            self.window = (self.window * 2).min(LARGE);
        } else if read < SMALL && self.window > SMALL {
            // The stream has slowed to command size: give the large buffer back, keeping the
            // few bytes it holds.
            self.window = SMALL;
            let mut small = BytesMut::with_capacity(SMALL);
            small.extend_from_slice(&self.buffer);
            self.buffer = small;
        }
    }

    /// The buffer's capacity, for tests.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buffer.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_buffer_grows_while_a_stream_fills_it_and_shrinks_after() {
        let message = vec![b'x'; 300 * 1024];
        let (mut client, mut server) = tokio::io::duplex(LARGE * 2);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"MAIL FROM:<a@b.test>\r\n").await?;
            client.write_all(&message).await?;
            Ok::<_, io::Error>(client)
        });
        let mut input = Input::default();
        // The command first, alone in the pipe: a small read.
        let mut received = 0;
        let mut largest = 0;
        while received < 22 + 300 * 1024 {
            let available = input.fill(&mut server).await.expect("read").len();
            assert!(available > 0, "the stream ended early at {received}");
            largest = largest.max(input.capacity());
            input.consume(available);
            received += available;
        }
        assert_eq!(received, 22 + 300 * 1024, "every byte once");
        assert!(
            largest >= LARGE,
            "grew to {largest} while the stream was full"
        );
        let mut client = writer.await.expect("writer").expect("written");
        // Then the stream slows to a command: the buffer is small again.
        {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"QUIT\r\n").await.expect("write");
        }
        assert_eq!(input.fill(&mut server).await.expect("read"), b"QUIT\r\n");
        assert!(input.capacity() <= 2 * SMALL, "{}", input.capacity());
        input.consume(6);
        drop(client);
        assert!(input.fill(&mut server).await.expect("end").is_empty());
    }
}
