//! STARTTLS (RFC 3207): refused when commands were pipelined after it (CVE-2011-0411), then the
//! handshake within the command timeout, and everything learnt before TLS forgotten. And
//! implicit TLS (RFC 8314), where the handshake comes before the greeting.

use super::session::{Flow, Greeting, Session, Transaction};
use crate::mail::reply::Reply;
use crate::net::conn::Conn;
use crate::net::stream::Stream;

impl Session {
    /// The handshake of an implicit-TLS listener, within `timeout`.
    pub(super) async fn accept_implicit(
        tcp: tokio::net::TcpStream,
        services: &super::services::Services,
        timeout: std::time::Duration,
    ) -> std::io::Result<Stream> {
        let Some(acceptor) = services.tls_acceptor.clone() else {
            return Err(std::io::Error::other(
                "no certificate configured for implicit TLS",
            ));
        };
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        Ok(Stream::ServerTls(Box::new(tls)))
    }

    pub(super) fn starttls_command(&mut self, argument: &str) -> Flow {
        if !argument.trim().is_empty() {
            return self.error(Reply::new(501, "5.5.4", "Syntax: STARTTLS"));
        }
        if self.services.tls_acceptor.is_none() || self.conn.stream().is_tls() {
            return self.error(Reply::new(454, "4.7.0", "TLS not available"));
        }
        if self.conn.has_buffered_input() {
            // Commands pipelined after STARTTLS would cross into the TLS session (CVE-2011-0411).
            self.reply(Reply::new(
                554,
                "5.5.1",
                "Error: commands pipelined after STARTTLS",
            ));
            return Flow::Close;
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        Flow::StartTls
    }

    pub(super) async fn start_tls(&mut self) -> std::io::Result<()> {
        let Some(acceptor) = self.services.tls_acceptor.clone() else {
            return Ok(());
        };
        let conn = std::mem::replace(&mut self.conn, Conn::new(Stream::Detached));
        let Stream::Plain(tcp) = conn.into_stream() else {
            return Err(std::io::Error::other("STARTTLS on a TLS stream"));
        };
        // A client that asks for TLS and then says nothing must not hold the session forever.
        let timeout = self.config().smtp.command_timeout;
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        self.conn = Conn::new(Stream::ServerTls(Box::new(tls))).with_write_timeout(timeout);
        // RFC 3207 4.2: forget everything learnt before TLS.
        if self.transaction.sender.is_some() {
            self.close_trace(None);
        }
        self.greeting = Greeting::None;
        self.forget_tenants();
        self.transaction = Transaction::default();
        self.auth_identity = None;
        tracing::debug!(tls = ?self.conn.stream().tls_description(), "TLS established");
        Ok(())
    }
}
