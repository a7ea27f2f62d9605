//! A plain SMTP client for tests: sends exact bytes and reads exact replies.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// The connection under a test client: plain TCP, or TLS after STARTTLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct TestClient {
    reader: BufReader<ReadHalf<Box<dyn Io>>>,
    writer: WriteHalf<Box<dyn Io>>,
}

/// A reply: its code and its full text (all lines, CRLF-joined).
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl TestClient {
    /// Connects without reading the greeting.
    pub async fn connect_raw(port: u16) -> TestClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        TestClient::over(stream)
    }

    /// Like [`TestClient::connect_raw`], but `None` when nothing listens any more.
    pub async fn try_connect_raw(port: u16) -> Option<TestClient> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        Some(TestClient::over(stream))
    }

    fn over(stream: TcpStream) -> TestClient {
        TestClient::over_io(Box::new(stream))
    }

    fn over_io(stream: Box<dyn Io>) -> TestClient {
        let (read, write) = tokio::io::split(stream);
        TestClient {
            reader: BufReader::new(read),
            writer: write,
        }
    }

    /// Says STARTTLS, does the handshake (any certificate) and says EHLO again.
    pub async fn starttls(mut self) -> TestClient {
        let reply = self.command("STARTTLS").await;
        assert_eq!(reply.code, 220, "{reply:?}");
        assert!(self.reader.buffer().is_empty(), "data after the 220");
        let stream = self.reader.into_inner().unsplit(self.writer);
        let connector = tokio_rustls::TlsConnector::from(
            switchyard::net::verify::accepting_config().expect("TLS config"),
        );
        let name = rustls::pki_types::ServerName::try_from("mx.switchyard.test").expect("name");
        let tls = connector
            .connect(name, stream)
            .await
            .expect("TLS handshake");
        let mut client = TestClient::over_io(Box::new(tls));
        let ehlo = client.command("EHLO client.test").await;
        assert_eq!(ehlo.code, 250, "{ehlo:?}");
        client
    }

    /// Connects from another loopback address (127.0.0.0/8 is all local on Linux), without
    /// reading the greeting.
    pub async fn connect_raw_from(source: std::net::Ipv4Addr, port: u16) -> TestClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind((source, 0).into())
            .expect("bind the source address");
        let stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connect");
        TestClient::over(stream)
    }

    /// Connects, reads the greeting and says EHLO.
    pub async fn connect(port: u16) -> TestClient {
        let mut client = TestClient::connect_raw(port).await;
        let greeting = client.reply().await;
        assert_eq!(greeting.code, 220, "{greeting:?}");
        let ehlo = client.command("EHLO client.test").await;
        assert_eq!(ehlo.code, 250, "{ehlo:?}");
        client
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("send");
    }

    /// Like [`TestClient::send`], but returns the error (the server may have closed).
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    pub async fn reply(&mut self) -> Reply {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(30), self.reader.read_line(&mut line))
                    .await
                    .expect("reply within 30s")
                    .expect("read reply");
            assert!(read > 0, "connection closed; got so far: {text:?}");
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                let code = text[..3].parse().expect("reply code");
                return Reply {
                    code,
                    text: text.trim_end().to_string(),
                };
            }
        }
    }

    /// Like [`TestClient::reply`], but `None` instead of a panic when the connection is gone.
    pub async fn reply_checked(&mut self) -> Option<Reply> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(30), self.reader.read_line(&mut line))
                    .await
                    .expect("no reply line within 30 s");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                let code = text.get(..3)?.parse().ok()?;
                return Some(Reply {
                    code,
                    text: text.trim_end().to_string(),
                });
            }
        }
    }

    pub async fn command(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// MAIL, RCPTs and DATA with `content` (CRLF, not yet dot-stuffed); returns the final reply.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], content: &str) -> Reply {
        let reply = self.command(&format!("MAIL FROM:<{from}>")).await;
        assert_eq!(reply.code, 250, "{reply:?}");
        for recipient in to {
            let reply = self.command(&format!("RCPT TO:<{recipient}>")).await;
            assert_eq!(reply.code, 250, "{reply:?}");
        }
        let reply = self.command("DATA").await;
        assert_eq!(reply.code, 354, "{reply:?}");
        let stuffed = content.replace("\r\n.", "\r\n..");
        self.send(stuffed.as_bytes()).await;
        self.send(b".\r\n").await;
        self.reply().await
    }

    /// Sends a message that must be accepted; returns its queue id.
    pub async fn send_accepted(&mut self, from: &str, to: &[&str], content: &str) -> String {
        let reply = self.send_mail(from, to, content).await;
        assert_eq!(reply.code, 250, "{reply:?}");
        reply
            .text
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// True when the server has closed the connection.
    pub async fn is_closed(&mut self) -> bool {
        let mut line = String::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut line)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

pub fn message(subject: &str) -> String {
    format!("From: a@sender.test\r\nTo: b@switchyard.test\r\nSubject: {subject}\r\n\r\nHello.\r\n")
}
